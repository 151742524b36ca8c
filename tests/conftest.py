"""Shared helpers for proxy tests: in-process upstreams and proxies on 127.0.0.1 port 0.

pytest-asyncio is not used; async tests are plain functions calling `run(coro)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run one async test body on a fresh loop, with an overall limit so a hang fails, not blocks."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def upstream(app: web.Application | None = None, name: str = "up") -> AsyncIterator[str]:
    """An aiohttp server on 127.0.0.1:0; yields "127.0.0.1:port"."""
    from demo_upstream import create_app

    runner = web.AppRunner(app if app is not None else create_app(name), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server  # noqa: SLF001 - the bound port is only known here
    assert server is not None and server.sockets
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def make_config(text: str, base_dir: Path | None = None) -> Any:
    from sluice.proxy.config import parse_config

    base = base_dir if base_dir is not None else ROOT
    return parse_config(textwrap.dedent(text), source="<test>", base_dir=base)


@contextlib.asynccontextmanager
async def proxy(config_text: str, base_dir: Path | None = None) -> AsyncIterator[Any]:
    """A `Gateway` listening on 127.0.0.1:0 (whatever `listen` says); yields it."""
    from sluice.proxy.app import Gateway

    config = make_config(config_text, base_dir)
    gateway = Gateway(config)
    await gateway.start("127.0.0.1", 0)
    try:
        yield gateway
    finally:
        await gateway.stop(drain_timeout=5.0)


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    """Poll a condition (for things with no event to wait on), failing after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def gather(*aws: Awaitable[T]) -> list[T]:
    return list(await asyncio.gather(*aws))


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
