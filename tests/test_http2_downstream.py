"""The HTTP/2 downstream codec and its asyncio driver, with real clients over real sockets.

curl (h2c prior knowledge and h2 over TLS with ALPN) for ordinary traffic and big bodies both
ways; a raw h2 client for flow-control stalls, trailers and the floods.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import h2.errors
import h2.events
import pytest
import trustme
import uvloop
from conftest import run
from h2util import EchoRecorder, RawClient, h2_server, pattern_body
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame
from tlsutil import write_ca, write_pair

from sluice.proxy.http2.downstream import H2ServerConnection, request_fields
from sluice.proxy.http2.events import (
    CloseReason,
    ConnectionEnded,
    H2Counters,
    H2Limits,
    RequestData,
    RequestHeaders,
    StreamReset,
)
from sluice.proxy.tls.server import ServerTls, ServerTlsSettings

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
GET = [(":method", "GET"), (":scheme", "http"), (":authority", "t.test"), (":path", "/")]


async def curl(*args: str, timeout: float = 30) -> tuple[int, bytes, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "20", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out, err.decode(errors="replace")


# -- pure codec ----------------------------------------------------------------------------------


def test_request_fields_present_pseudo_headers_like_envoy() -> None:
    raw = [
        (b":scheme", b"https"),
        (b":path", b"/a?b"),
        (b":authority", b"x.test"),
        (b":method", b"POST"),
        (b"cookie", b"a=1"),
        (b"accept", b"*/*"),
        (b"cookie", b"b=2"),
    ]
    assert request_fields(raw) == (
        (":method", "POST"),
        (":path", "/a?b"),
        (":authority", "x.test"),
        (":scheme", "https"),
        ("accept", "*/*"),
        ("cookie", "a=1; b=2"),
    )
    # host stands in for a missing :authority.
    fields = request_fields([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h.test")])
    assert fields[2] == (":authority", "h.test") and all(k != "host" for k, _ in fields)


def client_pair(limits: H2Limits) -> tuple[h2.connection.H2Connection, H2ServerConnection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    server = H2ServerConnection(limits)
    server.initiate()
    server.receive(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive(client.data_to_send())  # the SETTINGS ack: our limits are in force
    return client, server


def test_max_concurrent_streams_is_enforced() -> None:
    client, server = client_pair(H2Limits(max_concurrent_streams=3))
    assert client.remote_settings.max_concurrent_streams == 3
    for _ in range(3):
        client.send_headers(client.get_next_available_stream_id(), GET, end_stream=True)
    events = server.receive(client.data_to_send())
    assert [type(e) for e in events] == [RequestHeaders] * 3
    # A client that ignores the limit gets a connection error (h2 treats it as one).
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    raw.data_to_send()
    frame = HeadersFrame(9, flags=["END_HEADERS", "END_STREAM"])
    frame.data = client.encoder.encode(GET)
    (ended,) = server.receive(frame.serialize())
    assert isinstance(ended, ConnectionEnded) and ended.reason is CloseReason.PROTOCOL_ERROR
    assert server.counters.protocol_errors == 1


def test_oversized_header_list_is_refused_before_settings_ack() -> None:
    server = H2ServerConnection(H2Limits(max_header_list_size=4096))
    server.initiate()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [*GET, ("x-big", "v" * 8000)], end_stream=True)
    events = server.receive(client.data_to_send())
    assert isinstance(events[-1], ConnectionEnded) and events[-1].reason is CloseReason.HEADER_LIST_TOO_LARGE
    assert events[-1].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert server.counters.header_list_too_large == 1


def test_request_window_opens_only_as_the_body_is_consumed() -> None:
    client, server = client_pair(H2Limits(initial_stream_window=32768, connection_window=10**6))
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(":method", "POST"), *GET[1:]], end_stream=False)
    server.receive(client.data_to_send())
    client.send_data(sid, b"x" * 16384)
    client.send_data(sid, b"x" * 16384)
    events = server.receive(client.data_to_send())
    assert sum(len(e.data) for e in events if isinstance(e, RequestData)) == 32768
    client.receive_data(server.data_to_send())
    assert client.local_flow_control_window(sid) == 0  # nothing consumed: no WINDOW_UPDATE
    server.consumed(sid, 10000)
    client.receive_data(server.data_to_send())
    assert client.local_flow_control_window(sid) == 10000


# -- real clients --------------------------------------------------------------------------------


@needs_curl
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_curl_h2c_prior_knowledge_and_big_bodies_both_ways(loop: str, tmp_path: Path) -> None:
    handler = EchoRecorder(slow_read_s=0.3)
    limits = H2Limits(initial_stream_window=65536, connection_window=256 * 1024)
    upload = pattern_body(4 * 1024 * 1024 + 17)
    (tmp_path / "up.bin").write_bytes(upload)

    async def body() -> None:
        async with h2_server(handler, limits=limits) as (port, _):
            base = f"http://127.0.0.1:{port}"
            code, out, err = await curl("--http2-prior-knowledge", "-H", "Cookie: a=1", f"{base}/hello?x=1")
            assert code == 0, err
            doc = json.loads(out)
            names = [k for k, _ in doc["headers"]]
            assert names[:4] == [":method", ":path", ":authority", ":scheme"]
            assert doc["headers"][1] == [":path", "/hello?x=1"]
            assert doc["headers"][2] == [":authority", f"127.0.0.1:{port}"]
            code, out, err = await curl(
                "--http2-prior-knowledge", "--data-binary", f"@{tmp_path / 'up.bin'}", f"{base}/upload"
            )
            assert code == 0, err
            doc = json.loads(out)
            assert doc["body_len"] == len(upload) and doc["body_sha256"] == hashlib.sha256(upload).hexdigest()
            # The server held at most one stream window while the handler did not read.
            assert 0 < handler.max_buffered <= 65536
            size = 6 * 1024 * 1024 + 5
            code, out, err = await curl("--http2-prior-knowledge", f"{base}/download/{size}")
            assert code == 0, err
            assert out == pattern_body(size)

    if loop == "uvloop":
        uvloop.run(asyncio.wait_for(body(), 60))
    else:
        run(body())


@needs_curl
def test_curl_h2_over_tls_with_alpn(tmp_path: Path) -> None:
    ca = trustme.CA()
    tls = ServerTls(ServerTlsSettings((write_pair(tmp_path, ca.issue_cert("h2.test"), "h2"),)))
    ca_file = write_ca(tmp_path, ca)

    async def body() -> None:
        async with h2_server(EchoRecorder(), ssl_context=tls.context) as (port, _):
            code, out, err = await curl(
                "--http2",
                "--cacert",
                str(ca_file),
                "--resolve",
                f"h2.test:{port}:127.0.0.1",
                "-w",
                "\n%{http_version}",
                f"https://h2.test:{port}/tls",
            )
            assert code == 0, err
            text, version = out.rsplit(b"\n", 1)
            assert version == b"2"
            doc = json.loads(text)
            assert [":scheme", "https"] in doc["headers"] and [":authority", f"h2.test:{port}"] in doc["headers"]
            assert doc["tls_version"] == "TLSv1.3"  # read by the handler through stream.connection

    run(body())


def test_trailers_both_ways_and_a_stalled_reader_bounds_the_send_queue() -> None:
    handler = EchoRecorder()
    limits = H2Limits(send_high_water=128 * 1024)

    async def body() -> None:
        async with h2_server(handler, limits=limits) as (port, _):
            client = await RawClient.connect(port, initial_window=16384)
            await client.pump()
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, [(":method", "POST"), *GET[1:3], (":path", "/t"), ("te", "trailers")])
            client.conn.send_data(sid, b"payload")
            client.conn.send_headers(sid, [("grpc-status", "0"), ("x-t", "1")], end_stream=True)
            client.flush()
            got_trailers = None
            while got_trailers is None:
                assert await client.pump()
                for event in client.events:
                    if isinstance(event, h2.events.TrailersReceived):
                        got_trailers = event.headers
            assert got_trailers == [("x-echo-grpc-status", "0"), ("x-echo-x-t", "1")]
            # A 3 MB download to a client that stops acknowledging: the server queues about the
            # high-water mark, not the body.
            size = 3 * 1024 * 1024
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, [*GET[:3], (":path", f"/download/{size}")], end_stream=True)
            client.flush()
            received = 0
            for _ in range(20):  # read without acknowledging anything
                try:
                    if not await client.pump(0.05):
                        break
                except TimeoutError:
                    break
            received = sum(len(e.data) for e in client.events if isinstance(e, h2.events.DataReceived))
            assert received <= 16384 + 16384
            await asyncio.sleep(0.2)
            assert 0 < handler.max_pending_send <= 128 * 1024 + 65536
            # Now acknowledge as we go: the whole body arrives intact.
            data = bytearray()
            done = False
            seen = 0
            while not done:
                for event in client.events[seen:]:
                    if isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                        data += event.data
                        client.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                    if isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                        done = True
                seen = len(client.events)
                client.flush()
                if not done:
                    assert await client.pump()
            assert bytes(data) == pattern_body(size)
            client.close()

    run(body())


@needs_curl
def test_rapid_reset_flood_gets_goaway_while_others_are_served() -> None:
    counters = H2Counters()
    handler = EchoRecorder(slow_read_s=0.05)
    limits = H2Limits(max_resets_per_interval=100)

    async def body() -> None:
        async with h2_server(handler, limits=limits, counters=counters) as (port, protos):
            size = 2 * 1024 * 1024
            bystander = asyncio.ensure_future(
                curl("--http2-prior-knowledge", "--limit-rate", "4M", f"http://127.0.0.1:{port}/download/{size}")
            )
            while handler.streams == 0:  # the bystander's download has started
                await asyncio.sleep(0.01)
            attacker = await RawClient.connect(port)
            await attacker.pump()
            for _ in range(5):
                for _ in range(50):
                    sid = attacker.conn.get_next_available_stream_id()
                    attacker.conn.send_headers(sid, GET, end_stream=True)
                    attacker.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                attacker.flush()
                await attacker.drained()
            goaway = await attacker.until_goaway()
            assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            assert goaway.additional_data == b"rapid_reset"
            assert counters.rapid_reset_closes == 1 and counters.resets_by_peer >= 101
            attacker.close()
            attacked = [p for p in protos if p.ended is not None and p.ended.reason is CloseReason.RAPID_RESET]
            assert len(attacked) == 1
            # The connection that was being served during the flood finished its download.
            code, out, err = await bystander
            assert code == 0 and out == pattern_body(size), err
            assert protos[0].ended is None or protos[0].ended.reason is not CloseReason.RAPID_RESET
            code, out, err = await curl("--http2-prior-knowledge", f"http://127.0.0.1:{port}/after")
            assert code == 0 and json.loads(out)["body_len"] == 0, err

    run(body())


@pytest.mark.parametrize(
    ("flood", "reason", "error_code"),
    [
        ("continuation", CloseReason.PROTOCOL_ERROR, h2.errors.ErrorCodes.PROTOCOL_ERROR),
        ("settings", CloseReason.SETTINGS_FLOOD, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM),
        ("ping", CloseReason.PING_FLOOD, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM),
        ("empty_data", CloseReason.EMPTY_FRAME_FLOOD, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM),
    ],
)
def test_floods_get_goaway(flood: str, reason: CloseReason, error_code: int) -> None:
    counters = H2Counters()

    async def body() -> None:
        async with h2_server(EchoRecorder(), counters=counters) as (port, protos):
            attacker = await RawClient.connect(port)
            await attacker.pump()
            if flood == "continuation":
                head = HeadersFrame(1)
                head.data = attacker.conn.encoder.encode(GET)
                attacker.send_frames([head] + [ContinuationFrame(1, data=b"\x00" * 16) for _ in range(100)])
            elif flood == "settings":
                attacker.send_frames([SettingsFrame(0) for _ in range(150)])
            elif flood == "ping":
                attacker.send_frames([PingFrame(0, opaque_data=i.to_bytes(8, "big")) for i in range(150)])
            else:
                attacker.conn.send_headers(1, [(":method", "POST"), *GET[1:]])
                attacker.flush()
                attacker.send_frames([_empty_data(1) for _ in range(250)])
            await attacker.drained()
            goaway = await attacker.until_goaway()
            assert goaway is not None and goaway.error_code == error_code
            attacker.close()
            assert protos[0].ended is not None and protos[0].ended.reason is reason
            # The listener still serves a well-behaved client.
            polite = await RawClient.connect(port)
            await polite.pump()
            polite.conn.send_headers(1, GET, end_stream=True)
            polite.flush()
            while not any(isinstance(e, h2.events.StreamEnded) for e in polite.events):
                assert await polite.pump()
            polite.close()

    run(body())
    snapshot = counters.snapshot()
    expected = {
        CloseReason.PROTOCOL_ERROR: "protocol_errors",
        CloseReason.SETTINGS_FLOOD: "settings_flood_closes",
        CloseReason.PING_FLOOD: "ping_flood_closes",
        CloseReason.EMPTY_FRAME_FLOOD: "empty_frame_flood_closes",
    }[reason]
    assert snapshot[expected] == 1 and snapshot["connections"] == 2


def _empty_data(stream_id: int) -> object:
    from hyperframe.frame import DataFrame

    return DataFrame(stream_id, data=b"")


def test_handler_failure_resets_only_its_stream() -> None:
    async def handler(stream: object) -> None:
        from sluice.proxy.http2.protocol import H2Stream

        assert isinstance(stream, H2Stream)
        if dict(stream.headers)[":path"] == "/boom":
            raise RuntimeError("handler bug")
        stream.send_response([(":status", "204")], end_stream=True)

    async def body() -> None:
        async with h2_server(handler) as (port, _):
            client = await RawClient.connect(port)
            await client.pump()
            client.conn.send_headers(1, [*GET[:3], (":path", "/boom")], end_stream=True)
            client.conn.send_headers(3, GET, end_stream=True)
            client.flush()
            while not (
                any(isinstance(e, h2.events.StreamReset) and e.stream_id == 1 for e in client.events)
                and any(isinstance(e, h2.events.ResponseReceived) and e.stream_id == 3 for e in client.events)
            ):
                assert await client.pump()
            reset = next(e for e in client.events if isinstance(e, h2.events.StreamReset))
            assert reset.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
            client.close()

    run(body())


def test_stream_reset_event_reaches_the_driver() -> None:
    client, server = client_pair(H2Limits())
    client.send_headers(1, GET, end_stream=True)
    server.receive(client.data_to_send())
    client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    (event,) = server.receive(client.data_to_send())
    assert event == StreamReset(1, h2.errors.ErrorCodes.CANCEL, True)
    assert server.open_streams == 0


@needs_curl
def test_graceful_shutdown_finishes_open_streams_and_refuses_new_ones() -> None:
    started = asyncio.Event()

    async def handler(stream: object) -> None:
        from sluice.proxy.http2.protocol import H2Stream

        assert isinstance(stream, H2Stream)
        started.set()
        await asyncio.sleep(0.3)
        stream.send_response([(":status", "200")])
        await stream.send_data(b"finished", end_stream=True)

    async def body() -> None:
        async with h2_server(handler) as (port, protos):
            request = asyncio.ensure_future(curl("--http2-prior-knowledge", f"http://127.0.0.1:{port}/slow"))
            await asyncio.wait_for(started.wait(), 10)
            protos[0].shutdown()
            code, out, err = await request
            assert code == 0 and out == b"finished", err  # the open stream finished first
            await asyncio.wait_for(protos[0].closed, 2)
            assert protos[0].ended is not None and protos[0].ended.reason is CloseReason.SHUTDOWN

    run(body())


def test_streams_opened_after_our_goaway_are_refused() -> None:
    client, server = client_pair(H2Limits())
    client.send_headers(1, GET, end_stream=True)
    server.receive(client.data_to_send())
    server.goaway()
    out = server.data_to_send()
    assert b"\x00\x00\x08\x07" in out  # a GOAWAY frame header (length 8, type 7)
    # A client that has not read the GOAWAY yet; h2 (as client) would refuse to send, so the
    # frame is built by hand.
    frame = HeadersFrame(3, flags=["END_HEADERS", "END_STREAM"])
    frame.data = client.encoder.encode(GET)
    assert server.receive(frame.serialize()) == []
    assert b"\x00\x00\x04\x03" in server.data_to_send()  # RST_STREAM frame header (length 4, type 3)
    server.send_response(1, [(":status", "204")], end_stream=True)
    assert server.ended is not None and server.ended.reason is CloseReason.SHUTDOWN


def test_counters_export_to_prometheus() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from sluice.proxy.http2.export import H2CountersCollector

    counters = H2Counters(connections=3, rapid_reset_closes=1)
    registry = CollectorRegistry()
    registry.register(H2CountersCollector(lambda: [("https", counters)]))
    text = generate_latest(registry).decode()
    assert 'sluice_http2_rapid_reset_closes_total{listener="https"} 1.0' in text
    assert 'sluice_http2_connections_total{listener="https"} 3.0' in text
    assert text.count("# TYPE sluice_http2_") == 9


def test_garbage_never_escapes_the_codec() -> None:
    """Valid frames with random bytes mixed in, fed in random slices: every outcome is an event
    (at worst ConnectionEnded), never an exception out of `receive`."""
    import random

    ended = 0
    for seed in range(400):
        rnd = random.Random(seed)
        server = H2ServerConnection()
        server.initiate()
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, [(":method", "POST"), *GET[1:]])
        client.send_data(1, b"body", end_stream=True)
        blob = bytearray(client.data_to_send())
        blob += bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 200)))
        for _ in range(rnd.randrange(0, 4)):
            blob[rnd.randrange(24, len(blob))] = rnd.randrange(256)
        pos = 0
        while pos < len(blob):
            step = rnd.randrange(1, 64)
            events = server.receive(bytes(blob[pos : pos + step]))
            pos += step
            ended += any(isinstance(e, ConnectionEnded) for e in events)
        server.data_to_send()
    # Many garbled connections are refused (GOAWAY queued); the rest wait for the rest of a frame.
    assert ended > 50


def test_made_you_reset_counts_server_side_resets() -> None:
    """DATA on a stream the client already ended makes h2 reset it (STREAM_CLOSED); a client that
    does it over and over is closed like a rapid-reset client."""
    from hyperframe.frame import DataFrame

    client, server = client_pair(H2Limits(max_resets_per_interval=50))
    ended = None
    resets = 0
    for sid in range(1, 2 * 100, 2):
        head = HeadersFrame(sid, flags=["END_HEADERS", "END_STREAM"])
        head.data = client.encoder.encode(GET)
        events = server.receive(head.serialize() + DataFrame(sid, data=b"late").serialize())
        resets += sum(1 for e in events if isinstance(e, StreamReset) and not e.by_peer)
        ended = next((e for e in events if isinstance(e, ConnectionEnded)), None)
        if ended is not None:
            break
    assert resets == 51
    assert ended is not None and ended.reason is CloseReason.RAPID_RESET
    assert ended.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
