"""A chain entry's `log_level` through the live proxy, at start, after reloads and after a VM is
recreated; `POST /logging` settings kept across a VM recreation and a hot reload that carries the
plugin over (tests/fixtures/wat/levels.wat logs one line per level on each request)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import wasmtime
from aiohttp import web

from sluice.proxy.admin import AdminServer
from sluice.proxy.app import Gateway
from sluice.proxy.config import load_config

WAT = Path(__file__).resolve().parent / "fixtures" / "wat" / "levels.wat"

CONFIG = """\
listen: 127.0.0.1:0
admin: {{listen: "127.0.0.1:0"}}
access_log: null
filters_dir: filters
cache_dir: cache
clusters:
  up: {{endpoints: ["127.0.0.1:{port}"]}}
chain:
  - {{name: lv, module: levels.wasm, failure_policy: reload, {level}}}
routes:
  - {{match: {{prefix: {prefix}}}, cluster: up}}
"""


@pytest.fixture
def restore_logger() -> Any:
    logger = logging.getLogger("sluice.filter.lv")
    saved = logger.level
    yield
    logger.setLevel(saved)


@contextlib.asynccontextmanager
async def live(tmp: Path, level: str) -> AsyncIterator[tuple[Gateway, AdminServer, int, Path]]:
    app = web.Application()
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="up")

    app.router.add_route("*", "/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    (tmp / "filters").mkdir()
    (tmp / "filters" / "levels.wasm").write_bytes(wasmtime.wat2wasm(WAT.read_text()))
    path = tmp / "sluice.yaml"
    path.write_text(CONFIG.format(port=port, level=level, prefix="/"))
    gateway = Gateway(load_config(path))
    await gateway.start("127.0.0.1", 0)
    admin = AdminServer(gateway)
    await admin.start("127.0.0.1", 0)
    try:
        yield gateway, admin, port, path
    finally:
        await admin.stop()
        await gateway.stop(drain_timeout=5.0)
        await runner.cleanup()


def levels_logged(caplog: pytest.LogCaptureFixture) -> list[int]:
    out = [int(r.getMessage().rsplit("=", 1)[1]) for r in caplog.records
           if r.name == "sluice.filter.lv" and "level=" in r.getMessage()]
    caplog.clear()
    return out


async def one_request(gw: Gateway, **headers: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.port}/", headers=headers) as r:
        await r.read()
        return r.status


def test_entry_levels_and_logging_settings_survive(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   restore_logger: Any) -> None:
    logging.getLogger("sluice.filter.lv").setLevel(logging.NOTSET)  # as in a fresh process

    async def main() -> None:
        async with live(tmp_path, "log_level: trace") as (gw, admin, port, path):
            assert gw.reloader is not None
            # At start: every level, trace included.
            assert await one_request(gw) == 200
            assert levels_logged(caplog) == [0, 1, 2, 3, 4, 5]
            # A reload that changes the entry: a new plugin at the entry's new level.
            path.write_text(CONFIG.format(port=port, level="log_level: debug", prefix="/"))
            event = await gw.reloader.reload()
            assert event.ok, event
            assert await one_request(gw) == 200
            assert levels_logged(caplog) == [1, 2, 3, 4, 5]
            # POST /logging, then a VM recreated by the `reload` failure policy: the level stays.
            async with aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{admin.port}/logging?level=trace&filter=lv"
                async with s.post(url) as r:
                    assert r.status == 200
            assert await one_request(gw) == 200
            assert levels_logged(caplog) == [0, 1, 2, 3, 4, 5]
            plugin = gw.generation.filters[0].plugin
            assert await one_request(gw, **{"x-trap": "1"}) == 503
            deadline = time.monotonic() + 10
            while plugin.report().counters.reloads < 1:
                assert time.monotonic() < deadline, plugin.report()
                await asyncio.sleep(0.05)
            caplog.clear()
            assert await one_request(gw) == 200
            assert levels_logged(caplog) == [0, 1, 2, 3, 4, 5]
            # A hot reload that carries the plugin over (only the routes changed): still trace.
            path.write_text(CONFIG.format(port=port, level="log_level: debug", prefix="/x"))
            event = await gw.reloader.reload()
            assert event.ok, event
            assert gw.generation.filters[0].plugin is plugin
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.port}/x") as r:
                assert r.status == 200
            assert levels_logged(caplog) == [0, 1, 2, 3, 4, 5]

    asyncio.run(main())
