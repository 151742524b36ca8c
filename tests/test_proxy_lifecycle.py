"""Process-level behaviour: graceful shutdown of `python -m sluice.proxy run`, WebSocket pass-through."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp import WSMsgType, web
from conftest import ROOT, proxy, run, upstream


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_serving(s: aiohttp.ClientSession, url: str) -> None:
    """Wait until a proxy started as a process answers `url` with 200."""
    for _ in range(300):
        try:
            async with s.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError("proxy did not start")


def test_sigterm_drains_in_flight_request_and_exits_0(tmp_path: Path) -> None:
    started = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(1.5)
        return web.Response(text="slept")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/hello", hello)

    async def main() -> None:
        async with upstream(app) as up:
            port, admin = free_port(), free_port()
            cfg = tmp_path / "sluice.yaml"
            cfg.write_text(
                f"""
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{admin}"}}
access_log: null
drain_timeout: 20
clusters:
  web: {{endpoints: ["{up}"]}}
routes:
  - match: {{prefix: /}}
    cluster: web
"""
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sluice.proxy",
                "run",
                "-c",
                str(cfg),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            try:
                async with aiohttp.ClientSession() as s:
                    await wait_serving(s, f"http://127.0.0.1:{port}/hello")
                    pending = asyncio.ensure_future(s.get(f"http://127.0.0.1:{port}/slow"))
                    # Signal only once the request went through the proxy to the upstream.
                    await started.wait()
                    os.kill(proc.pid, signal.SIGTERM)
                    resp = await pending
                    assert resp.status == 200
                    assert await resp.text() == "slept"
                    resp.release()
                code = await asyncio.wait_for(proc.wait(), 30)
                assert code == 0
                # New connections are refused once draining started.
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    pass
                else:
                    writer.close()
                    raise AssertionError("still accepting after shutdown")
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    run(main(), timeout=60)


def test_websocket_passes_through() -> None:
    async def main() -> None:
        async with upstream(name="ws") as up:
            cfg = f"""
            listen: 127.0.0.1:0
            access_log: null
            clusters:
              web: {{endpoints: ["{up}"]}}
            routes:
              - match: {{prefix: /}}
                cluster: web
            """
            async with proxy(cfg) as gw, aiohttp.ClientSession() as s:
                async with s.ws_connect(f"http://127.0.0.1:{gw.port}/ws") as ws:
                    await ws.send_str("hi")
                    msg = await ws.receive()
                    assert msg.type == WSMsgType.TEXT and msg.data == "ws: hi"
                    await ws.send_bytes(b"\x00\x01" * 50_000)
                    msg = await ws.receive()
                    assert msg.type == WSMsgType.BINARY and msg.data == b"\x00\x01" * 50_000
                    await ws.close()
                assert gw.stats.websocket_upgrades == 1
                # Ordinary requests still work afterwards.
                async with s.get(f"http://127.0.0.1:{gw.port}/hello") as r:
                    assert r.status == 200

    run(main())
