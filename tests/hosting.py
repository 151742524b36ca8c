"""Test support: the single-filter rig (a real Runtime and a real Host on an asyncio loop), a
live proxy with its admin API in front of a small upstream, and small helpers the abi and filter
tests share."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from sluice import abi
from sluice.proxy.admin import AdminServer
from sluice.proxy.app import Gateway
from sluice.proxy.config import load_config
from sluice.proxy.filtertest import Exchange, FilterRig, Phase, Recorder

__all__ = [
    "Exchange", "FilterRig", "LiveProxy", "Phase", "Recorder", "closed_port", "live_proxy", "metric_values", "rh",
]


@dataclasses.dataclass
class LiveProxy:
    gateway: Gateway
    admin: AdminServer
    config_path: Path
    upstream_port: int

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.gateway.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin.port}{path}"


@contextlib.asynccontextmanager
async def live_proxy(
    tmp: Path, config: Callable[[int], str], modules: dict[str, bytes]
) -> AsyncIterator[LiveProxy]:
    """sluice (proxy and admin API on 127.0.0.1 port 0) run from `tmp/sluice.yaml`, which is
    `config(upstream_port)`, with `modules` written to `tmp/filters`. The upstream answers every
    path with 200 "up", except `/missing` (404)."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=404 if request.path == "/missing" else 200, text="up")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])
    (tmp / "filters").mkdir()
    for name, data in modules.items():
        (tmp / "filters" / name).write_bytes(data)
    path = tmp / "sluice.yaml"
    path.write_text(config(port))
    gateway = Gateway(load_config(path))
    await gateway.start("127.0.0.1", 0)
    admin = AdminServer(gateway)
    await admin.start("127.0.0.1", 0)
    try:
        yield LiveProxy(gateway, admin, path, port)
    finally:
        await admin.stop()
        await gateway.stop(drain_timeout=5.0)
        await runner.cleanup()


def rh(ex: Exchange) -> abi.HeaderMap:
    """Response headers as the filter left them (for exchanges that always have a response)."""
    assert ex.response_headers is not None
    return ex.response_headers


def metric_values(plugin: abi.Plugin) -> dict[str, int]:
    """The filter's ABI-defined metrics by name (counter/gauge value, histogram sample count)."""
    return {m.name: m.value for m in plugin.report().metrics}


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released): callouts to it fail at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
