"""The HTTP/2 upstream client against real HTTP/2 servers: the codec's server (h2c and TLS with
ALPN) and grpcio's, including a gRPC round trip through a small proxy built from both halves."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import h2.errors
import pytest
import trustme
from conftest import run
from h2util import EchoRecorder, h2_server, pattern_body
from tlsutil import write_ca, write_pair

from sluice.abi import HeaderMap
from sluice.proxy.http2.events import H2Limits
from sluice.proxy.http2.protocol import H2Stream
from sluice.proxy.http2.upstream import H2Endpoint, H2UpstreamExchange, request_headers
from sluice.proxy.tls.client import ClientTlsSettings, build_client_context
from sluice.proxy.tls.server import ALPN_HTTP1, ServerTls, ServerTlsSettings
from sluice.proxy.upstream import ConnectFailed, UpstreamReset, UpstreamTimeout


async def exchange(
    endpoint: H2Endpoint,
    path: str,
    *,
    method: str = "GET",
    body: bytes = b"",
    trailers: HeaderMap | None = None,
    fields: list[tuple[str, str]] | None = None,
) -> tuple[H2UpstreamExchange, int, bytes]:
    ex = await endpoint.exchange()
    has_body = bool(body) or trailers is not None
    ex.start_request(
        method, path, [("host", "up.test"), *(fields or [])], body=has_body, content_length=None
    )
    if has_body:
        for start in range(0, len(body), 100_000):
            await ex.write_body(body[start : start + 100_000], end=False)
        ex.end_request(trailers)
    head = await ex.read_head(10)
    data = bytearray()
    while (chunk := await ex.read_body()) is not None:
        data += chunk
    ex.release()
    return ex, head.status, bytes(data)


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


def test_h2c_multiplexed_exchanges_trailers_and_big_bodies() -> None:
    handler = EchoRecorder()

    async def body() -> None:
        async with h2_server(handler, limits=H2Limits(max_concurrent_streams=4)) as (port, protos):
            endpoint = H2Endpoint("127.0.0.1", port)
            ex, status, data = await exchange(endpoint, "/one", fields=[("x-q", "v")])
            doc = json.loads(data)
            assert status == 200 and [":authority", "up.test"] in doc["headers"] and ["x-q", "v"] in doc["headers"]
            assert ex.response_trailers is None and ex.reusable
            # Trailers both ways.
            ex, status, data = await exchange(
                endpoint, "/t", method="POST", body=b"abc", trailers=HeaderMap([("grpc-status", "0")])
            )
            assert json.loads(data)["trailers"] == [["grpc-status", "0"]]
            assert ex.response_trailers == HeaderMap([("x-echo-grpc-status", "0")])
            # Twenty at once over one connection, four streams at a time (the server's limit).
            results = await asyncio.gather(*(exchange(endpoint, f"/c{i}") for i in range(20)))
            assert all(status == 200 for _, status, _ in results)
            assert endpoint.connects == 1 and len(protos) == 1
            # Bodies larger than every window, both ways.
            upload = pattern_body(3 * 1024 * 1024 + 1)
            _, _, data = await exchange(endpoint, "/up", method="POST", body=upload)
            assert json.loads(data)["body_sha256"] == hashlib.sha256(upload).hexdigest()
            _, _, data = await exchange(endpoint, f"/download/{5 * 1024 * 1024}")
            assert data == pattern_body(5 * 1024 * 1024)
            assert endpoint.connects == 1
            endpoint.close()

    run(body())


def test_tls_with_alpn_h2(tmp_path: Path) -> None:
    ca = trustme.CA()
    pair = write_pair(tmp_path, ca.issue_cert("up.test"), "up")
    tls = ServerTls(ServerTlsSettings((pair,)))
    only_http1 = ServerTls(ServerTlsSettings((pair,), alpn=(ALPN_HTTP1,)))
    settings = ClientTlsSettings(server_name="up.test", ca_file=write_ca(tmp_path, ca), alpn=("h2",))
    ctx = build_client_context(settings)

    async def body() -> None:
        async with h2_server(EchoRecorder(), ssl_context=tls.context) as (port, _):
            endpoint = H2Endpoint("127.0.0.1", port, ssl_context=ctx, server_hostname=settings.server_hostname("x"))
            _, status, data = await exchange(endpoint, "/secure")
            assert status == 200 and [":scheme", "https"] in json.loads(data)["headers"]
            endpoint.close()
            wrong = H2Endpoint("127.0.0.1", port, ssl_context=ctx, server_hostname="other.test")
            with pytest.raises(ConnectFailed, match="TLS handshake"):
                await wrong.exchange()
        async with h2_server(EchoRecorder(), ssl_context=only_http1.context) as (port, _):
            endpoint = H2Endpoint("127.0.0.1", port, ssl_context=ctx, server_hostname="up.test")
            with pytest.raises(ConnectFailed, match="did not agree to HTTP/2"):
                await endpoint.exchange()

    run(body())


def test_errors_map_to_the_http1_client_errors() -> None:
    async def handler(stream: H2Stream) -> None:
        path = dict(stream.headers)[":path"]
        if path == "/reset":
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif path == "/slow":
            await asyncio.sleep(2)
        stream.send_response([(":status", "204")], end_stream=True)

    async def body() -> None:
        async with h2_server(handler) as (port, protos):
            endpoint = H2Endpoint("127.0.0.1", port, connect_timeout=1)
            with pytest.raises(UpstreamReset, match="reset the stream"):
                await exchange(endpoint, "/reset")
            ex = await endpoint.exchange()
            ex.start_request("GET", "/slow", [("host", "x")], body=False, content_length=None)
            with pytest.raises(UpstreamTimeout):
                await ex.read_head(0.2)
            ex.close()
            # The connection survives stream errors.
            _, status, _ = await exchange(endpoint, "/fine")
            assert status == 204 and endpoint.connects == 1
            # A server that goes away: the next exchange gets a new connection.
            protos[0].close()
            await protos[0].closed
            await asyncio.sleep(0.05)
            _, status, _ = await exchange(endpoint, "/again")
            assert status == 204 and endpoint.connects == 2
            endpoint.close()
        with pytest.raises(ConnectFailed, match="connect to 127.0.0.1"):
            await H2Endpoint("127.0.0.1", port, connect_timeout=1).exchange()

    run(body())


# -- gRPC ----------------------------------------------------------------------------------------


def grpc_frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def start_grpc_server() -> tuple[grpc.Server, int]:
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        context.set_trailing_metadata((("x-upstream-trailer", "t1"),))
        return b"echo:" + request

    rpc = grpc.unary_unary_rpc_method_handler(say)  # no serializers: bytes in, bytes out
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Say": rpc}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


GRPC_FIELDS = [("content-type", "application/grpc"), ("te", "trailers")]


def test_grpc_unary_call_through_the_h2_client() -> None:
    server, port = start_grpc_server()

    async def body() -> None:
        endpoint = H2Endpoint("127.0.0.1", port)
        ex, status, data = await exchange(
            endpoint, "/test.Echo/Say", method="POST", body=grpc_frame(b"hello"), trailers=None, fields=GRPC_FIELDS
        )
        assert status == 200 and data == grpc_frame(b"echo:hello")
        trailers = ex.response_trailers
        assert trailers is not None and trailers.get("grpc-status") == "0"
        assert trailers.get("x-upstream-trailer") == "t1"
        # An error status arrives as a trailers-only response: grpc-status in the head.
        ex = await endpoint.exchange()
        ex.start_request("POST", "/test.Echo/Say", [("host", "g"), *GRPC_FIELDS], body=True, content_length=None)
        await ex.write_body(grpc_frame(b"missing"), end=True)
        head = await ex.read_head(5)
        assert head.headers.get("grpc-status") == "5" and head.headers.get("grpc-message") == "no such thing"
        assert await ex.read_body() is None and ex.response_complete
        ex.release()
        endpoint.close()

    try:
        run(body())
    finally:
        server.stop(None)


def test_grpc_client_through_a_proxy_made_of_both_halves() -> None:
    """grpcio client -> downstream codec -> upstream client -> grpcio server, and back; the proxy
    adds a response trailer the way a filter would, and grpc-status comes through intact."""
    server, upstream_port = start_grpc_server()

    async def body() -> None:
        endpoint = H2Endpoint("127.0.0.1", upstream_port)

        async def proxy(stream: H2Stream) -> None:
            headers = dict(stream.headers)
            fields = [("host", headers[":authority"])] + [(k, v) for k, v in stream.headers if k[0] != ":"]
            ex = await endpoint.exchange()
            try:
                ex.start_request(headers[":method"], headers[":path"], fields, body=True, content_length=None)
                while (chunk := await stream.read_body()) is not None:
                    await ex.write_body(chunk, end=False)
                ex.end_request(HeaderMap(stream.trailers) if stream.trailers else None)
                head = await ex.read_head(10)
                stream.send_response(head.headers.items(), end_stream=ex.response_complete)
                if ex.response_complete:
                    return
                while (data := await ex.read_body()) is not None:
                    await stream.send_data(data)
                stream.send_trailers([*(ex.response_trailers or ()), ("x-added-by-filter", "yes")])
            finally:
                ex.release()

        async with h2_server(proxy) as (port, _):

            def call(message: bytes) -> tuple[Any, Any]:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    method = channel.unary_unary("/test.Echo/Say")
                    try:
                        response, rpc = method.with_call(message, timeout=10)
                    except grpc.RpcError as err:
                        return err.code(), err.details()
                    return response, dict(rpc.trailing_metadata())

            response, trailers = await asyncio.to_thread(call, b"via proxy")
            assert response == b"echo:via proxy"
            assert trailers["x-upstream-trailer"] == "t1" and trailers["x-added-by-filter"] == "yes"
            code, details = await asyncio.to_thread(call, b"missing")
            assert code == grpc.StatusCode.NOT_FOUND and details == "no such thing"
        endpoint.close()

    try:
        run(body())
    finally:
        server.stop(None)


def test_response_window_opens_only_as_the_body_is_read() -> None:
    """A slow reader of a big response: the upstream can send one stream window ahead, no more."""
    from sluice.proxy.http2.upstream import STREAM_WINDOW

    handler = EchoRecorder()

    async def body() -> None:
        async with h2_server(handler, limits=H2Limits(send_high_water=128 * 1024)) as (port, protos):
            endpoint = H2Endpoint("127.0.0.1", port)
            ex = await endpoint.exchange()
            size = 6 * 1024 * 1024
            ex.start_request("GET", f"/download/{size}", [("host", "x")], body=False, content_length=None)
            await ex.read_head(5)
            await asyncio.sleep(0.3)  # read nothing: the server must stall, not buffer
            stalled = protos[0].codec.pending_bytes(1)
            assert 0 < stalled <= 128 * 1024 + 65536
            assert 0 < ex.buffered <= STREAM_WINDOW
            data = bytearray()
            while (chunk := await ex.read_body()) is not None:
                data += chunk
            assert bytes(data) == pattern_body(size)
            ex.release()
            endpoint.close()

    run(body())
