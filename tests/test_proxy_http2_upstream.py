"""`protocol: http2` clusters through a live sluice: HTTP/1.1 clients, HTTP/2 upstreams.

The upstreams are real HTTP/2 servers on loopback: the downstream codec's server (tests/h2util.py,
h2c and TLS with ALPN), nginx with `http2 on` when it is installed, and grpcio's. A WAT filter
(fixtures/wat/trailers.wat) shows what a filter sees in the response trailers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent import futures
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import h2.errors
import httptools
import pytest
import trustme
import wasmtime
from conftest import ROOT, proxy, run
from h2util import EchoRecorder, h2_server, pattern_body
from tlsutil import write_ca, write_pair

from sluice.proxy.http2.events import H2Limits
from sluice.proxy.http2.protocol import H2Stream
from sluice.proxy.tls.server import ALPN_HTTP1, ServerTls, ServerTlsSettings

WAT = ROOT / "tests" / "fixtures" / "wat"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "trailers.wasm").write_bytes(wasmtime.wat2wasm((WAT / "trailers.wat").read_text()))
    (tmp_path / "props.wasm").write_bytes(wasmtime.wat2wasm((WAT / "tls_props.wat").read_text()))
    return tmp_path


def config(port: int, *, tls: str = "null", filters: str = "trailers", cluster: str = "") -> str:
    chain = "".join(f"\n      - {{name: {f}, module: {f}.wasm}}" for f in filters.split(",") if f)
    return f"""
    listen: 127.0.0.1:0
    access_log: null
    filters_dir: .
    clusters:
      h2: {{endpoints: ["127.0.0.1:{port}"], protocol: http2, tls: {tls}, timeout: 2, {cluster}}}
    chain:{chain or " []"}
    routes:
      - match: {{prefix: /}}
        cluster: h2
    """


class Upstream(EchoRecorder):
    """EchoRecorder, plus `/grpcish` (a body and `grpc-status` trailers), `/slow` (answers after
    0.4 s), `/reset` (RST_STREAM), `/die` (the connection drops), `/hang` (never answers)."""

    async def __call__(self, stream: H2Stream) -> None:
        path = dict(stream.headers)[":path"]
        if path == "/grpcish":
            while await stream.read_body() is not None:
                pass
            stream.send_response([(":status", "200"), ("content-type", "application/grpc")])
            await stream.send_data(b"payload")
            stream.send_trailers([("grpc-status", "0"), ("grpc-message", "fine")])
        elif path == "/slow":
            await asyncio.sleep(0.4)
            stream.send_response([(":status", "200"), ("x-stream", str(stream.stream_id))], end_stream=True)
        elif path == "/reset":
            stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif path == "/die":
            transport = stream.connection.transport
            assert transport is not None
            transport.abort()
        elif path == "/hang":
            await asyncio.sleep(30)
        else:
            await super().__call__(stream)


# -- a raw HTTP/1.1 client (request trailers out, response trailers in) ---------------------------


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.body = bytearray()
        self.done = False
        self._in_trailers = False

    def on_header(self, name: bytes, value: bytes) -> None:
        target = self.trailers if self._in_trailers else self.headers
        target[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self._in_trailers = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


async def http1(port: int, request: bytes) -> Response:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    response = Response()
    parser = httptools.HttpResponseParser(response)
    writer.write(request)
    try:
        while not response.done:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                break
            parser.feed_data(data)
    finally:
        writer.close()
    response.status = parser.get_status_code()
    return response


def chunked_post(path: str, body: bytes, trailers: list[tuple[str, str]]) -> bytes:
    out = f"POST {path} HTTP/1.1\r\nHost: up.test\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n".encode()
    out += f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n"
    out += b"".join(f"{k}: {v}\r\n".encode() for k, v in trailers)
    return out + b"\r\n"


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, dict[str, str]]:
    async with session.get(url) as r:
        return r.status, await r.text(), {k.lower(): v for k, v in r.headers.items()}


# -- h2c (prior knowledge) --------------------------------------------------------------------------


def test_h2c_get_post_trailers_and_one_shared_connection(base: Path) -> None:
    handler = Upstream()

    async def main() -> None:
        async with h2_server(handler, limits=H2Limits(max_concurrent_streams=8)) as (port, protos):
            async with proxy(config(port), base) as gw, aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{gw.port}"
                status, text, headers = await get(s, url + "/one?q=1")
                assert status == 200, text
                seen = dict(tuple(pair) for pair in json.loads(text)["headers"])
                assert seen[":scheme"] == "http" and seen[":authority"] == f"127.0.0.1:{gw.port}"
                assert seen[":path"] == "/one?q=1" and seen[":method"] == "GET"
                assert "connection" not in seen and "via" in headers
                # A body bigger than every window, both ways.
                upload = pattern_body(3 * 1024 * 1024 + 7)
                async with s.post(url + "/up", data=upload) as r:
                    doc = await r.json(content_type=None)
                    assert r.status == 200 and doc["body_len"] == len(upload)
                    assert doc["body_sha256"] == hashlib.sha256(upload).hexdigest()
                async with s.get(url + f"/download/{4 * 1024 * 1024}") as r:
                    assert await r.read() == pattern_body(4 * 1024 * 1024)
                # Fifty at once over one connection, eight streams at a time (the server's limit).
                results = await asyncio.gather(*(get(s, url + f"/c{i}") for i in range(50)))
                assert [r[0] for r in results] == [200] * 50
                assert len(protos) == 1 and handler.streams == 53
                pool = gw.generation.clusters["h2"]
                assert pool.connects == 1
            # Request trailers from an HTTP/1.1 chunked body go on as HTTP/2 trailers; the
            # upstream's response trailers reach the filter and the client (chunked trailers).
            async with proxy(config(port), base) as gw:
                r = await http1(gw.port, chunked_post("/t", b"abc", [("x-req-trailer", "v1")]))
                assert r.status == 200 and r.done
                doc = json.loads(bytes(r.body))
                assert doc["trailers"] == [["x-req-trailer", "v1"]] and doc["body_len"] == 3
                assert r.headers.get("transfer-encoding") == "chunked"
                assert r.trailers["x-echo-x-req-trailer"] == "v1"
                assert r.trailers["x-filter-saw-grpc-status"] == "<missing>"
                r = await http1(gw.port, b"GET /grpcish HTTP/1.1\r\nHost: up.test\r\nTE: trailers\r\n\r\n")
                assert r.status == 200 and bytes(r.body) == b"payload"
                assert r.trailers == {
                    "grpc-status": "0", "grpc-message": "fine",
                    "x-filter-saw-grpc-status": "0", "x-filter-trailer": "added",
                }

    run(main())
