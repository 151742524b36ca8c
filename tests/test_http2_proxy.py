"""HTTP/2 downstream through a live sluice: ALPN h2 on a TLS listener and prior-knowledge h2c on a
plain one, every stream an exchange through the same filter chain as HTTP/1.1.

Real clients (curl --http2, a Python h2 client, a raw h2 client for hostile traffic), real
upstreams (the demo echo upstream; a raw HTTP/1.1 one for trailers both ways), real filters (the
AssemblyScript headers filter and a WAT filter that copies what it saw into headers and trailers);
certificates made at test time (trustme).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import h2.errors
import h2.events
import httptools
import pytest
import trustme
import wasmtime
from conftest import ROOT, make_config, proxy, run, upstream, wait_for
from h2util import H2Client, H2Response, RawClient
from tlsutil import trusting, write_ca, write_pair

from sluice.proxy.app import Gateway
from sluice.proxy.config import ConfigError, parse_config
from sluice.proxy.downstream_h2 import H2ClientConnection
from sluice.proxy.http2.events import H2Limits

SEEN_WAT = ROOT / "tests" / "fixtures" / "wat" / "h2_seen.wat"
AS_HEADERS = ROOT / "tests" / "fixtures" / "as" / "build" / "headers.wasm"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def files(tmp_path: Path, ca: trustme.CA) -> Path:
    write_pair(tmp_path, ca.issue_cert("localhost"), "server")
    write_ca(tmp_path, ca, "ca")
    (tmp_path / "seen.wasm").write_bytes(wasmtime.wat2wasm(SEEN_WAT.read_text()))
    (tmp_path / "headers.wasm").write_bytes(AS_HEADERS.read_bytes())
    return tmp_path


def h2_config(up: str, *, http2: str = "", trailers_up: str | None = None) -> str:
    block = f"http2: {http2}" if http2 else ""
    trailer_cluster = f'trailers: {{endpoints: ["{trailers_up}"]}}' if trailers_up else ""
    trailer_route = "- {match: {prefix: /trailers}, cluster: trailers}" if trailers_up else ""
    return f"""
    listen:
      - address: 127.0.0.1:0
        tls:
          certificates: [{{cert: server.crt, key: server.key}}]
          alpn: [h2, http/1.1]
        {block}
      - address: 127.0.0.1:0
        h2c: true
        {block}
    access_log: null
    filters_dir: .
    clusters:
      web: {{endpoints: ["{up}"]}}
      {trailer_cluster}
    chain:
      - {{name: headers, module: headers.wasm}}
      - {{name: seen, module: seen.wasm}}
    routes:
      {trailer_route}
      - match: {{prefix: /}}
        cluster: web
    """


def ports(gw: Gateway) -> tuple[int, int]:
    (_, tls_port), (_, plain_port) = gw.addresses
    return tls_port, plain_port


def echoed(body: bytes | bytearray) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(bytes(body))["headers"]}


@asynccontextmanager
async def trailer_upstream() -> AsyncIterator[tuple[str, list[dict[str, object]]]]:
    """An HTTP/1.1 upstream that records each request (head, body, chunked trailers) and answers
    with a chunked body and trailers."""
    seen: list[dict[str, object]] = []

    class Request:
        def __init__(self) -> None:
            self.headers: list[tuple[str, str]] = []
            self.trailers: list[tuple[str, str]] = []
            self.body = bytearray()
            self.in_body = False
            self.complete = False

        def on_header(self, name: bytes, value: bytes) -> None:
            (self.trailers if self.in_body else self.headers).append((name.decode().lower(), value.decode()))

        def on_headers_complete(self) -> None:
            self.in_body = True

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.complete = True

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = Request()
            parser = httptools.HttpRequestParser(request)
            while not request.complete:
                data = await reader.read(65536)
                if not data:
                    writer.close()
                    return
                parser.feed_data(data)
            seen.append({"headers": request.headers, "trailers": request.trailers, "body": bytes(request.body)})
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n"
                b"trailer: x-checksum\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: c0ffee\r\n\r\n"
            )
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", seen
    finally:
        server.close()
        await server.wait_closed()


# -- config ----------------------------------------------------------------------------------------


def config_errors(text: str, base: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="t.yaml", base_dir=base)
    return info.value.errors


def test_http2_listener_config_and_its_mistakes(files: Path) -> None:
    config = parse_config(
        "listen:\n  - address: 127.0.0.1:8443\n    tls: {certificates: [{cert: server.crt, key: server.key}],"
        " alpn: [h2, http/1.1]}\n    http2: {max_concurrent_streams: 8}\n"
        "  - {address: 127.0.0.1:8080, h2c: true}\n  - {address: 127.0.0.1:8081}\n",
        base_dir=files,
    )
    secure, h2c, plain = config.listeners
    assert secure.serves_http2 and h2c.serves_http2 and not plain.serves_http2
    assert secure.http2_overrides == {"max_concurrent_streams": 8} and h2c.http2_overrides == {}
    errors = config_errors(
        "listen:\n  - address: 127.0.0.1:0\n    tls: {certificates: [{cert: server.crt, key: server.key}]}\n"
        "    h2c: true\n"
        "  - {address: 127.0.0.1:1, http2: {max_concurrent_streams: 4}}\n"
        "  - address: 127.0.0.1:2\n    tls: {certificates: [{cert: server.crt, key: server.key}], alpn: [h3]}\n"
        "  - {address: 127.0.0.1:3, h2c: true, http2: {max_frame_size: 10}}\n",
        files,
    )
    assert errors[0] == (
        "t.yaml:2: listen[0]: h2c is for plain listeners; a TLS listener serves HTTP/2 with h2 in tls.alpn"
    )
    assert errors[1] == (
        "t.yaml:5: listen[1]: http2: this listener serves no HTTP/2 (add h2 to tls.alpn, or h2c: true)"
    )
    assert errors[2].startswith("t.yaml:7: listen[2].tls.alpn: ") and "unknown ALPN protocol 'h3'" in errors[2]
    assert errors[3].startswith("t.yaml:8: listen[3].http2.max_frame_size: "), errors
    assert len(errors) == 4, errors


# -- requests through the chain --------------------------------------------------------------------


def test_curl_http2_over_tls_get_and_post_through_the_chain(files: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")

    def curl(port: int, *args: str) -> tuple[str, dict[str, str], bytes]:
        out = subprocess.run(
            ["curl", "-s", "--http2", "--cacert", str(files / "ca.pem"), "-D", "-", "--max-time", "20",
             *args, f"https://localhost:{port}/anything?q=1"],
            capture_output=True, timeout=30, check=True,
        ).stdout
        head, _, body = out.partition(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        return status_line.strip(), headers, body

    async def main() -> None:
        async with upstream() as up, proxy(h2_config(up), files) as gw:
            tls_port, _ = ports(gw)
            loop = asyncio.get_running_loop()
            status, headers, body = await loop.run_in_executor(None, curl, tls_port)
            assert status == "HTTP/2 200", status
            assert headers["x-as-filter"] == "headers" and headers["server"] and "date" in headers
            assert "connection" not in headers and "transfer-encoding" not in headers
            seen = echoed(body)
            assert seen["x-seen-authority"] == f"localhost:{tls_port}"
            assert seen["x-seen-scheme"] == "https" and seen["x-seen-method"] == "GET"
            assert seen["x-as-seen"] == "GET /anything?q=1"
            assert seen["host"] == f"localhost:{tls_port}" and seen["x-forwarded-proto"] == "https"
            payload = bytes(range(256)) * 1000
            (files / "payload").write_bytes(payload)
            status, _, body = await loop.run_in_executor(
                None, curl, tls_port, "--data-binary", f"@{files / 'payload'}", "-H", "content-type: x/y"
            )
            assert status == "HTTP/2 200"
            answer = json.loads(body)
            assert answer["method"] == "POST" and answer["body_size"] == len(payload)
            assert echoed(body)["x-seen-method"] == "POST"
            (h2,) = gw.http2_listeners()[:1]
            assert h2.counters.streams >= 2 and h2.counters.connections >= 2

    run(main())


def test_python_h2_client_tls_and_h2c_protocol_property(files: Path, ca: trustme.CA) -> None:
    props = (ROOT / "tests" / "fixtures" / "wat" / "tls_props.wat").read_text()
    (files / "props.wasm").write_bytes(wasmtime.wat2wasm(props))
    config = h2_config("UP").replace("- {name: seen, module: seen.wasm}", "- {name: props, module: props.wasm}")

    async def main() -> None:
        async with upstream() as up, proxy(config.replace("UP", up), files) as gw:
            tls_port, plain_port = ports(gw)
            client = await H2Client.open(tls_port, trusting(ca))
            try:
                one, two = await asyncio.gather(
                    client.request("GET", "/a"), client.request("POST", "/b", body=b"x" * 100_000)
                )
            finally:
                await client.close()
            assert one.status == 200 and two.status == 200
            seen = echoed(one.body)
            assert seen["x-prop-5"] == "HTTP/2" and seen["x-prop-6"] == "https"
            assert seen["x-prop-0"] in ("TLSv1.2", "TLSv1.3") and seen["x-prop-1"] == "localhost"
            assert two.json()["body_size"] == 100_000
            # h2c prior knowledge on the plain listener; HTTP/1.1 still answered there too.
            plain = await H2Client.open(plain_port)
            try:
                answer = await plain.request("GET", "/c")
            finally:
                await plain.close()
            assert answer.status == 200
            seen = echoed(answer.body)
            assert seen["x-prop-5"] == "HTTP/2" and seen["x-prop-6"] == "http"
            reader, writer = await asyncio.open_connection("127.0.0.1", plain_port)
            writer.write(b"GET /d HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert data.startswith(b"HTTP/1.1 200 OK") and b'"x-prop-5", "HTTP/1.1"' in data

    run(main())


def test_trailers_both_ways_between_h2_client_and_http1_upstream(files: Path, ca: trustme.CA) -> None:
    async def main() -> None:
        async with upstream() as up, trailer_upstream() as (trailers_up, seen), proxy(
            h2_config(up, trailers_up=trailers_up), files
        ) as gw:
            tls_port, _ = ports(gw)
            client = await H2Client.open(tls_port, trusting(ca))
            try:
                answer = await client.request(
                    "POST", "/trailers", body=b"some body", trailers=[("x-client-trailer", "t1")]
                )
            finally:
                await client.close()
            assert answer.status == 200 and bytes(answer.body) == b"hello world"
            # The HTTP/1.1 upstream's chunked trailers reach the h2 client, with the filter's.
            assert answer.trailers == {"x-checksum": "c0ffee", "x-filter-trailer": "seen"}
            (request,) = seen
            head = dict(request["headers"])  # type: ignore[arg-type]
            assert head["transfer-encoding"] == "chunked" and head["x-seen-method"] == "POST"
            assert request["body"] == b"some body"
            # The client's trailers reach the upstream as chunked trailers, with the filter's.
            assert request["trailers"] == [("x-client-trailer", "t1"), ("x-filter-trailer", "seen")]

    run(main())


def test_large_response_with_small_client_window_arrives_whole(files: Path, ca: trustme.CA) -> None:
    async def main() -> None:
        async with upstream() as up, proxy(h2_config(up), files) as gw:
            tls_port, _ = ports(gw)
            client = await H2Client.open(tls_port, trusting(ca), window=4096, ack_delay_s=0.002)
            held = 0

            async def sample() -> None:
                # What the proxy holds for the client, unsent, while the client reads slowly.
                nonlocal held
                while True:
                    for conn in gw.server.connections:
                        if isinstance(conn, H2ClientConnection):
                            held = max(held, conn.codec.pending_bytes(1))
                    await asyncio.sleep(0.005)

            sampler = asyncio.get_running_loop().create_task(sample())
            try:
                answer = await client.request("GET", "/stream?n=24&size=65536&ms=0")
            finally:
                sampler.cancel()
                await client.close()
            assert answer.status == 200
            expected = b"".join(bytes([65 + i % 26]) * 65536 for i in range(24))
            assert len(answer.body) == len(expected) and bytes(answer.body) == expected
            # The upstream was paused: the proxy held the high-water mark and at most one more
            # read of the upstream socket (256 KiB on uvloop), not the 1.5 MiB response.
            limit = H2Limits().send_high_water
            assert limit // 2 < held <= limit + 256 * 1024 + 65536, held

    run(main())


# -- limits and floods -----------------------------------------------------------------------------


def test_rapid_reset_flood_gets_goaway_and_a_counter_others_served(files: Path, ca: trustme.CA) -> None:
    from aiohttp import ClientSession
    from prometheus_client import generate_latest

    from sluice.proxy.metrics import make_registry

    async def main() -> None:
        async with upstream() as up, proxy(h2_config(up), files) as gw:
            tls_port, plain_port = ports(gw)
            polite = await H2Client.open(tls_port, trusting(ca))
            hostile = await RawClient.connect(plain_port)
            try:
                for _ in range(260):
                    sid = hostile.conn.get_next_available_stream_id()
                    hostile.conn.send_headers(
                        sid, [(":method", "GET"), (":path", "/slow?ms=2000"), (":authority", "x"), (":scheme", "http")]
                    )
                    hostile.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                    hostile.flush()
                await hostile.drained()
                goaway = await hostile.until_goaway()
                assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
                assert goaway.additional_data == b"rapid_reset"
                answer = await polite.request("GET", "/after")
                assert answer.status == 200
            finally:
                hostile.close()
                await polite.close()
            h2c_counters = gw.http2_listeners()[1].counters
            assert h2c_counters.rapid_reset_closes == 1 and h2c_counters.resets_by_peer > 200
            text = generate_latest(make_registry(gw)[0]).decode()
            line = f'sluice_http2_rapid_reset_closes_total{{listener="127.0.0.1:{plain_port}"}} 1.0'
            assert line in text, text
            # The flood never held upstream connections for long: nothing is left running.
            await wait_for(lambda: gw.stats.requests_active == 0)
            async with ClientSession() as s, s.get(f"http://127.0.0.1:{plain_port}/x") as r:
                assert r.status == 200

    run(main())


def test_concurrent_stream_limit(files: Path, ca: trustme.CA) -> None:
    async def main() -> None:
        async with upstream() as up, proxy(h2_config(up, http2="{max_concurrent_streams: 2}"), files) as gw:
            tls_port, plain_port = ports(gw)
            polite = await H2Client.open(tls_port, trusting(ca))
            try:
                await asyncio.wait_for(polite.settings_seen, 10)
                assert polite.conn.remote_settings.max_concurrent_streams == 2
                answers = await asyncio.gather(*(polite.request("GET", "/slow?ms=200") for _ in range(2)))
                assert [a.status for a in answers] == [200, 200]
                # A client that opens a third stream before the first two ended loses the connection.
                hostile = await RawClient.connect(plain_port)
                try:
                    for _ in range(3):
                        sid = hostile.conn.get_next_available_stream_id()
                        hostile.conn.send_headers(
                            sid,
                            [(":method", "GET"), (":path", "/slow?ms=1000"), (":authority", "x"), (":scheme", "http")],
                            end_stream=True,
                        )
                    hostile.flush()
                    goaway = await hostile.until_goaway()
                finally:
                    hostile.close()
                assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
                assert gw.http2_listeners()[1].counters.protocol_errors == 1
                # The polite connection is still served.
                assert (await polite.request("GET", "/again")).status == 200
            finally:
                await polite.close()

    run(main())


def test_upstream_failure_mid_response_resets_only_that_stream(files: Path, ca: trustme.CA) -> None:
    """An upstream that dies mid-response cuts its stream (RST_STREAM), not the connection."""

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(broken, "127.0.0.1", 0)
        bad = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            async with upstream() as up, proxy(h2_config(up, trailers_up=bad), files) as gw:
                tls_port, _ = ports(gw)
                client = await H2Client.open(tls_port, trusting(ca))
                try:
                    cut = await client.request("GET", "/trailers/broken")
                    assert cut.status == 200 and cut.reset == h2.errors.ErrorCodes.INTERNAL_ERROR
                    assert (await client.request("GET", "/fine")).status == 200
                    assert client.terminated is None
                finally:
                    await client.close()
                assert gw.stats.resets["upstream_reset"] == 1
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_drain_sends_goaway_and_lets_open_streams_finish(files: Path) -> None:
    # curl (nghttp2) rather than the Python client: h2 drops every frame after a GOAWAY.
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")

    async def main() -> None:
        async with upstream() as up:
            gw = Gateway(make_config(h2_config(up), files))
            await gw.start()
            tls_port, _ = ports(gw)
            try:
                curl = await asyncio.create_subprocess_exec(
                    "curl", "-s", "--http2", "--cacert", str(files / "ca.pem"), "-w", "\n%{http_version} %{http_code}",
                    f"https://localhost:{tls_port}/slow?ms=400",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                )
                await wait_for(lambda: gw.stats.requests_active == 1)
                assert any(isinstance(c, H2ClientConnection) for c in gw.server.connections)
                await gw.stop(drain_timeout=5.0)
                out, _ = await asyncio.wait_for(curl.communicate(), 10)
                assert out.decode().endswith("slept 400 ms\n\n2 200"), out
                assert not gw.server.connections
            finally:
                with contextlib.suppress(Exception):
                    await gw.stop(drain_timeout=1.0)

    run(main())


def test_ping_flood_and_oversized_header_list_end_only_that_connection(files: Path, ca: trustme.CA) -> None:
    async def main() -> None:
        config = h2_config("UP", http2="{max_header_list_size: 4096}")
        async with upstream() as up, proxy(config.replace("UP", up), files) as gw:
            tls_port, plain_port = ports(gw)
            counters = gw.http2_listeners()[1].counters
            pinger = await RawClient.connect(plain_port)
            try:
                for i in range(150):
                    pinger.conn.ping(i.to_bytes(8, "big"))
                pinger.flush()
                goaway = await pinger.until_goaway()
            finally:
                pinger.close()
            assert goaway is not None and goaway.additional_data == b"ping_flood"
            assert counters.ping_flood_closes == 1
            big = await RawClient.connect(plain_port)
            try:
                big.conn.send_headers(
                    1, [(":method", "GET"), (":path", "/"), (":authority", "x"), (":scheme", "http"),
                        ("x-big", "v" * 8000)], end_stream=True,
                )
                big.flush()
                goaway = await big.until_goaway()
            finally:
                big.close()
            assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            assert counters.header_list_too_large == 1
            client = await H2Client.open(tls_port, trusting(ca))
            try:
                assert (await client.request("GET", "/still", headers=[("x-small", "v" * 100)])).status == 200
            finally:
                await client.close()

    run(main())


def test_stalled_request_body_gets_408_on_its_stream_only(files: Path, ca: trustme.CA) -> None:
    config = h2_config("UP").rstrip() + "\n    timeouts: {request_body_idle: 0.3}\n"

    async def main() -> None:
        async with upstream() as up, proxy(config.replace("UP", up), files) as gw:
            tls_port, _ = ports(gw)
            client = await H2Client.open(tls_port, trusting(ca))
            try:
                sid = client.conn.get_next_available_stream_id()
                stalled = client.responses[sid] = H2Response()
                client.conn.send_headers(
                    sid, [(":method", "POST"), (":path", "/upload"), (":authority", "localhost"), (":scheme", "https")]
                )
                client.conn.send_data(sid, b"first part")
                client.writer.write(client.conn.data_to_send())
                head = await client.request("HEAD", "/anything")
                assert head.status == 200 and not head.body and int(head.headers["content-length"]) > 0
                await asyncio.wait_for(stalled.done, 10)
                assert stalled.status == 408 and bytes(stalled.body) == b"request body timeout\n"
                assert gw.stats.rejections["request_body_timeout"] == 1
                assert (await client.request("GET", "/after")).status == 200
            finally:
                await client.close()

    run(main())


def test_filter_local_reply_same_over_h2_and_http1_and_unread_body_is_refused(files: Path, ca: trustme.CA) -> None:
    (files / "local_reply.wasm").write_bytes((AS_HEADERS.parent / "local_reply.wasm").read_bytes())
    seen = "- {name: seen, module: seen.wasm}"
    config = h2_config("UP").replace(seen, seen + "\n      - {name: deny, module: local_reply.wasm}")

    async def main() -> None:
        async with upstream() as up, proxy(config.replace("UP", up), files) as gw:
            tls_port, plain_port = ports(gw)
            client = await H2Client.open(tls_port, trusting(ca))
            try:
                denied = await client.request("GET", "/deny/x")
                # A POST answered before its body ended: the whole 403, then RST_STREAM(NO_ERROR).
                sid = client.conn.get_next_available_stream_id()
                early = client.responses[sid] = H2Response()
                client.conn.send_headers(
                    sid, [(":method", "POST"), (":path", "/deny/y"), (":authority", "localhost"), (":scheme", "https")]
                )
                client.conn.send_data(sid, b"more to come")
                client.writer.write(client.conn.data_to_send())
                await asyncio.wait_for(early.done, 10)
                await wait_for(lambda: early.reset is not None)
                assert early.reset == h2.errors.ErrorCodes.NO_ERROR
                assert (await client.request("GET", "/fine")).status == 200
            finally:
                await client.close()
            assert denied.status == 403 and bytes(denied.body) == b"denied by as"
            assert denied.headers["x-denied"] == "1" and denied.headers["x-as-filter"] == "headers"
            assert denied.headers["content-length"] == "12"
            assert early.status == 403 and bytes(early.body) == b"denied by as"
            # The same reply over HTTP/1.1, field for field (but the framing).
            reader, writer = await asyncio.open_connection("127.0.0.1", plain_port)
            writer.write(b"GET /deny/x HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            head, _, body = raw.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            assert lines[0] == "HTTP/1.1 403 Forbidden" and body == b"denied by as"
            fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            fields.pop("connection")
            assert set(fields) == set(denied.headers), (fields, denied.headers)
            assert all(fields[k] == v for k, v in denied.headers.items() if k != "date")

    run(main())
