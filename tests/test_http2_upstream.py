"""The HTTP/2 upstream client (`H2ClusterPool` leasing `H2UpstreamStream`s) driven the way the
exchange drives it, against real HTTP/2 servers: the downstream codec's server and grpcio's.

Through a live sluice: tests/test_proxy_http2_upstream.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable

import h2.errors
import pytest
from conftest import run
from h2util import EchoRecorder, grpc_frame, h2_server, pattern_body, start_grpc_server
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, SettingsFrame

from sluice.abi import HeaderMap
from sluice.proxy.clusters import ClusterPool, H2ClusterPool
from sluice.proxy.http import UpstreamRequest
from sluice.proxy.http2.events import H2Limits
from sluice.proxy.http2.protocol import H2Stream
from sluice.proxy.http2.upstream import STREAM_WINDOW, H2UpstreamStream, _GoawayScanner, request_headers
from sluice.proxy.upstream import ResponseHead, UpstreamError, UpstreamLease


class Collected:
    """A `ResponseSink` that keeps everything, with a future for the end."""

    def __init__(self) -> None:
        self.head: ResponseHead | None = None
        self.body = bytearray()
        self.calls = 0
        self.writable = asyncio.Event()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def upstream_response(self, head: ResponseHead | None, body: bytes, complete: bool) -> None:
        self.calls += 1
        if head is not None:
            self.head = head
        self.body += body
        if complete and not self.done.done():
            self.done.set_result(None)

    def upstream_failed(self, exc: UpstreamError) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def upstream_writable(self) -> None:
        self.writable.set()


def request(method: str, path: str, *, body: bool = False, length: int | None = None,
            fields: list[tuple[str, str]] | None = None) -> UpstreamRequest:
    return UpstreamRequest(method, path, [("host", "up.test"), *(fields or [])], body, length, not body)


async def exchange(
    pool: ClusterPool, path: str, *, method: str = "GET", body: bytes = b"", trailers: HeaderMap | None = None,
    fields: list[tuple[str, str]] | None = None,
) -> tuple[UpstreamLease, Collected]:
    """One request the way the exchange sends it: start, body in pieces (waiting while full), end."""
    conn = await pool.acquire()
    sink = Collected()
    has_body = bool(body) or trailers is not None
    try:
        conn.start_request(request(method, path, body=has_body, fields=fields), sink, 10.0)
        for start in range(0, len(body), 100_000):
            if conn.write_body(body[start : start + 100_000], False):
                sink.writable.clear()
                await asyncio.wait_for(sink.writable.wait(), 10)
        if has_body:
            conn.end_request(trailers)
        await sink.done
    finally:
        conn.detach()
        pool.release(conn)
    return conn, sink


def test_request_headers_translate_http1_fields() -> None:
    fields = [("host", "a.test"), ("connection", "keep-alive"), ("te", "trailers"), ("x-a", "1"), ("te", "gzip")]
    assert request_headers("POST", "https", "/p", fields, 5) == [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", "a.test"),
        (":path", "/p"),
        ("te", "trailers"),
        ("x-a", "1"),
        ("content-length", "5"),
    ]


def note(seen: list[tuple[int, int]]) -> Callable[[int, int], None]:
    return lambda last, code: seen.append((last, code))


def test_goaway_scanner_takes_goaway_out_at_any_split() -> None:
    goaway = GoAwayFrame(0, last_stream_id=5, error_code=0).serialize()
    stream = (
        SettingsFrame(0).serialize()
        + HeadersFrame(1, data=b"x" * 20, flags=["END_HEADERS"]).serialize()
        + DataFrame(1, data=b"y" * 300).serialize()
        + goaway
        + DataFrame(3, data=b"z" * 40, flags=["END_STREAM"]).serialize()
    )
    expected = stream.replace(goaway, b"")
    for size in (1, 2, 7, 9, 10, 31, 64, 500, len(stream)):
        scanner = _GoawayScanner()
        seen: list[tuple[int, int]] = []
        out = b"".join(scanner.feed(stream[i : i + size], note(seen)) for i in range(0, len(stream), size))
        assert out == expected and seen == [(5, 0)], size
    # Without a GOAWAY a read passes through as the same object.
    plain = DataFrame(1, data=b"q" * 10).serialize()
    assert _GoawayScanner().feed(plain, lambda last, code: None) is plain


def test_multiplexed_streams_trailers_and_big_bodies() -> None:
    handler = EchoRecorder()

    async def body() -> None:
        async with h2_server(handler, limits=H2Limits(max_concurrent_streams=4)) as (port, protos):
            pool = H2ClusterPool("c", [("127.0.0.1", port)])
            conn, sink = await exchange(pool, "/one", fields=[("x-q", "v")])
            assert isinstance(conn, H2UpstreamStream) and conn.reusable
            assert sink.head is not None and sink.head.status == 200
            doc = json.loads(sink.body)
            assert [":authority", "up.test"] in doc["headers"] and ["x-q", "v"] in doc["headers"]
            # Trailers both ways.
            trailers = HeaderMap([("grpc-status", "0")])
            conn, sink = await exchange(pool, "/t", method="POST", body=b"abc", trailers=trailers)
            assert json.loads(sink.body)["trailers"] == [["grpc-status", "0"]]
            assert conn.response_trailers == HeaderMap([("x-echo-grpc-status", "0")])
            # Twenty at once over one connection, four streams at a time (the server's limit).
            results = await asyncio.gather(*(exchange(pool, f"/c{i}") for i in range(20)))
            assert all(s.head is not None and s.head.status == 200 for _, s in results)
            assert pool.connects == 1 and len(protos) == 1
            # Bodies larger than every window, both ways: the upload waits for windows.
            upload = pattern_body(3 * 1024 * 1024 + 1)
            _, sink = await exchange(pool, "/up", method="POST", body=upload)
            assert json.loads(sink.body)["body_sha256"] == hashlib.sha256(upload).hexdigest()
            _, sink = await exchange(pool, f"/download/{5 * 1024 * 1024}")
            assert bytes(sink.body) == pattern_body(5 * 1024 * 1024)
            assert pool.connects == 1
            pool.close()

    run(body())


def test_request_body_waits_for_the_window_and_says_when_it_reopens() -> None:
    handler = EchoRecorder(slow_read_s=0.3)

    async def body() -> None:
        async with h2_server(handler, limits=H2Limits(initial_stream_window=64 * 1024)) as (port, _):
            pool = H2ClusterPool("c", [("127.0.0.1", port)])
            conn = await pool.acquire()
            sink = Collected()
            data = pattern_body(1024 * 1024)
            full = conn.start_request(request("POST", "/up", body=True, length=len(data)), sink, 10.0, data, True)
            assert full and conn.write_paused  # a 64 KiB window cannot take 1 MiB
            await asyncio.wait_for(sink.writable.wait(), 10)
            assert not conn.write_paused
            await sink.done
            assert json.loads(sink.body)["body_len"] == len(data)
            assert handler.max_buffered <= 64 * 1024
            conn.detach()
            pool.release(conn)
            pool.close()

    run(body())


def test_response_window_opens_only_as_the_reader_resumes() -> None:
    """A paused reader of a big response: the upstream can send one stream window ahead, no more."""

    async def body() -> None:
        async with h2_server(EchoRecorder(), limits=H2Limits(send_high_water=128 * 1024)) as (port, protos):
            pool = H2ClusterPool("c", [("127.0.0.1", port)])
            conn = await pool.acquire()
            sink = Collected()
            size = 6 * 1024 * 1024
            conn.start_request(request("GET", f"/download/{size}"), sink, 10.0)
            conn.pause_reading()
            await asyncio.sleep(0.5)  # read nothing more: the server must stall, not buffer
            assert 0 < len(sink.body) <= STREAM_WINDOW
            stalled = protos[0].codec.pending_bytes(1)
            assert 0 < stalled <= 128 * 1024 + 65536
            conn.resume_reading()
            await sink.done
            assert bytes(sink.body) == pattern_body(size)
            conn.detach()
            pool.release(conn)
            pool.close()

    run(body())


def test_stream_errors_leave_the_connection_and_a_dead_one_is_replaced() -> None:
    async def handler(stream: H2Stream) -> None:
        path = dict(stream.headers)[":path"]
        if path == "/reset":
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        stream.send_response([(":status", "204")], end_stream=True)

    async def body() -> None:
        async with h2_server(handler) as (port, protos):
            pool = H2ClusterPool("c", [("127.0.0.1", port)], connect_timeout=1)
            with pytest.raises(UpstreamError, match="reset the stream"):
                await exchange(pool, "/reset")
            _, sink = await exchange(pool, "/fine")
            assert sink.head is not None and sink.head.status == 204 and pool.connects == 1
            protos[0].close()
            await protos[0].closed
            await asyncio.sleep(0.05)
            _, sink = await exchange(pool, "/again")
            assert sink.head is not None and sink.head.status == 204 and pool.connects == 2
            pool.close()

    run(body())


# -- gRPC ----------------------------------------------------------------------------------------


GRPC_FIELDS = [("content-type", "application/grpc"), ("te", "trailers")]


def test_grpc_unary_call_through_the_h2_client() -> None:
    server, port = start_grpc_server()

    async def body() -> None:
        pool = H2ClusterPool("g", [("127.0.0.1", port)])
        conn, sink = await exchange(
            pool, "/test.Echo/Say", method="POST", body=grpc_frame(b"hello"), trailers=None, fields=GRPC_FIELDS
        )
        assert sink.head is not None and sink.head.status == 200 and bytes(sink.body) == grpc_frame(b"echo:hello")
        trailers = conn.response_trailers
        assert trailers is not None and trailers.get("grpc-status") == "0"
        assert trailers.get("x-upstream-trailer") == "t1"
        # An error status arrives as a trailers-only response: grpc-status in the head.
        conn, sink = await exchange(
            pool, "/test.Echo/Say", method="POST", body=grpc_frame(b"missing"), fields=GRPC_FIELDS
        )
        assert sink.head is not None
        assert sink.head.headers.get("grpc-status") == "5" and sink.head.headers.get("grpc-message") == "no such thing"
        assert not sink.body and conn.response_trailers is None
        pool.close()

    try:
        run(body())
    finally:
        server.stop(None)
