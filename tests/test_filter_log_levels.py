"""A chain entry's `log_level` through the live proxy, at start, after reloads and after a VM is
recreated; `POST /logging` settings kept across a VM recreation and a hot reload that carries the
plugin over (tests/fixtures/wat/levels.wat logs one line per level on each request)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import wasmtime
from hosting import LiveProxy, live_proxy

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


def levels_logged(caplog: pytest.LogCaptureFixture) -> list[int]:
    out = [int(r.getMessage().rsplit("=", 1)[1]) for r in caplog.records
           if r.name == "sluice.filter.lv" and "level=" in r.getMessage()]
    caplog.clear()
    return out


async def one_request(live: LiveProxy, path: str = "/", **headers: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(live.url(path), headers=headers) as r:
        await r.read()
        return r.status


def config(level: str, prefix: str = "/") -> Callable[[int], str]:
    return lambda port: CONFIG.format(port=port, level=f"log_level: {level}", prefix=prefix)


def test_entry_levels_and_logging_settings_survive(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   restore_logger: Any) -> None:
    logging.getLogger("sluice.filter.lv").setLevel(logging.NOTSET)  # as in a fresh process
    module = wasmtime.wat2wasm(WAT.read_text())

    async def reload(live: LiveProxy, level: str, prefix: str = "/") -> None:
        live.config_path.write_text(config(level, prefix)(live.upstream_port))
        assert live.gateway.reloader is not None
        event = await live.gateway.reloader.reload()
        assert event.ok, event

    async def main() -> None:
        async with live_proxy(tmp_path, config("trace"), {"levels.wasm": module}) as live:
            # At start: every level, trace included.
            assert await one_request(live) == 200
            assert levels_logged(caplog) == [0, 1, 2, 3, 4, 5]
            # A reload that changes the entry: a new plugin at the entry's new level.
            await reload(live, "debug")
            assert await one_request(live) == 200
            assert levels_logged(caplog) == [1, 2, 3, 4, 5]
            # POST /logging, then a VM recreated by the `reload` failure policy: the level stays.
            async with aiohttp.ClientSession() as s, s.post(live.admin_url("/logging?level=trace&filter=lv")) as r:
                assert r.status == 200
            assert await one_request(live) == 200
            assert levels_logged(caplog) == [0, 1, 2, 3, 4, 5]
            plugin = live.gateway.generation.filters[0].plugin
            assert await one_request(live, **{"x-trap": "1"}) == 503
            deadline = time.monotonic() + 10
            while plugin.report().counters.reloads < 1:
                assert time.monotonic() < deadline, plugin.report()
                await asyncio.sleep(0.05)
            caplog.clear()
            assert await one_request(live) == 200
            assert levels_logged(caplog) == [0, 1, 2, 3, 4, 5]
            # A hot reload that carries the plugin over (only the routes changed): still trace.
            await reload(live, "debug", "/x")
            assert live.gateway.generation.filters[0].plugin is plugin
            assert await one_request(live, "/x") == 200
            assert levels_logged(caplog) == [0, 1, 2, 3, 4, 5]

    asyncio.run(main())
