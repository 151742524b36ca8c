"""Choosing HTTP/2 or HTTP/1.1 per connection: ALPN on TLS, the preface on an h2c listener."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import pytest
import trustme
import uvloop
from conftest import run
from h2util import EchoRecorder
from tlsutil import server_port, write_ca, write_pair

from sluice.proxy.http2.protocol import H2DownstreamProtocol
from sluice.proxy.http2.select import ProtocolSelector, WireProtocol
from sluice.proxy.tls.server import ServerTls, ServerTlsSettings

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


class TinyHttp1(asyncio.Protocol):
    """Answers the first request head with a fixed response and remembers what it was sent."""

    seen: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data:
            TinyHttp1.seen.append(self.data)
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhttp1")
            self.transport.close()


@asynccontextmanager
async def listener(h2c: bool, ssl_context: object = None) -> AsyncIterator[tuple[int, list[ProtocolSelector]]]:
    loop = asyncio.get_running_loop()
    selectors: list[ProtocolSelector] = []

    def factory() -> ProtocolSelector:
        selector = ProtocolSelector(TinyHttp1, lambda: H2DownstreamProtocol(EchoRecorder()), h2c=h2c)
        selectors.append(selector)
        return selector

    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=ssl_context)  # type: ignore[arg-type]
    try:
        yield await server_port(server), selectors
    finally:
        server.close()
        await server.wait_closed()


async def curl(*args: str) -> tuple[int, bytes, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode or 0, out, err.decode(errors="replace")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_plain_listener_with_h2c_serves_both(loop: str) -> None:
    async def body() -> None:
        async with listener(h2c=True) as (port, selectors):
            code, out, err = await curl("--http2-prior-knowledge", f"http://127.0.0.1:{port}/x")
            assert code == 0, err
            assert [":path", "/x"] in json.loads(out)["headers"]
            code, out, err = await curl("--http1.1", f"http://127.0.0.1:{port}/y")
            assert code == 0 and out == b"http1", err
            assert TinyHttp1.seen[-1].startswith(b"GET /y HTTP/1.1\r\n")  # nothing was lost on the way
            assert [s.chosen for s in selectors] == [WireProtocol.H2, WireProtocol.HTTP1]

    if loop == "uvloop":
        uvloop.run(asyncio.wait_for(body(), 30))
    else:
        run(body())


def test_plain_listener_without_h2c_is_http1_only() -> None:
    async def body() -> None:
        async with listener(h2c=False) as (port, selectors):
            code, out, err = await curl("--http1.1", f"http://127.0.0.1:{port}/z")
            assert code == 0 and out == b"http1", err
            assert selectors[0].chosen is WireProtocol.HTTP1

    run(body())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tls_listener_follows_alpn(loop: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    tls = ServerTls(ServerTlsSettings((write_pair(tmp_path, ca.issue_cert("sel.test"), "sel"),)))
    ca_file = str(write_ca(tmp_path, ca))

    async def body() -> None:
        async with listener(h2c=False, ssl_context=tls.context) as (port, selectors):
            base = ["--cacert", ca_file, "--resolve", f"sel.test:{port}:127.0.0.1"]
            code, out, err = await curl(*base, "--http2", f"https://sel.test:{port}/tls2")
            assert code == 0, err
            assert [":scheme", "https"] in json.loads(out)["headers"]
            code, out, err = await curl(*base, "--http1.1", f"https://sel.test:{port}/tls1")
            assert code == 0 and out == b"http1", err
            assert [s.chosen for s in selectors] == [WireProtocol.H2, WireProtocol.HTTP1]

    if loop == "uvloop":
        uvloop.run(asyncio.wait_for(body(), 30))
    else:
        run(body())
