"""Hot reload (sluice/proxy/reload.py): filters and config swapped under load without dropping anything.

Each test runs an in-process proxy (config read from a file in tmp_path, so the Reloader watches
it) on 127.0.0.1 port 0 in front of real aiohttp upstreams on 127.0.0.1 port 0. The filter is
tests/fixtures/wat/versioned.wat, built in two versions that answer `x-version: 1` / `2`.

Nothing here asserts on speed: every wait polls a condition with a generous limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import wasmtime
from aiohttp import web
from conftest import run

from sluice.abi import PluginState
from sluice.proxy.app import Gateway
from sluice.proxy.config import load_config
from sluice.proxy.reload import Reloader, ReloadEvent

WAT = Path(__file__).parent / "fixtures" / "wat" / "versioned.wat"


def build_filter(version: str, *, configure_ok: bool = True, pad_to: int = 0) -> bytes:
    """The versioned test filter; `pad_to` appends a custom section to reach about that size."""
    text = (
        WAT.read_text()
        .replace("@VERSION_LEN@", str(len(version)))
        .replace("@VERSION@", version)
        .replace("@CONFIGURE@", "1" if configure_ok else "0")
    )
    wasm = bytes(wasmtime.wat2wasm(text))
    if pad_to > len(wasm):
        wasm += custom_section(b"padding", b"\0" * (pad_to - len(wasm) - 16))
    return wasm


def custom_section(name: bytes, payload: bytes) -> bytes:
    def leb(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    body = leb(len(name)) + name + payload
    return b"\0" + leb(len(body)) + body


def atomic_write(path: Path, data: bytes) -> None:
    """The recommended deployment: write a temporary file next to it, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- the rig ---------------------------------------------------------------------------------------


class Upstream:
    """An aiohttp app on 127.0.0.1:0: `/` answers its name, `/slow` waits for `release`,
    `/stream` sends 20 chunks 50 ms apart."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.release = asyncio.Event()
        self.slow_arrived = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/stream", self._stream)
        app.router.add_route("*", "/{tail:.*}", self._hello)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hello(self, request: web.Request) -> web.Response:
        return web.Response(text=self.name)

    async def _slow(self, request: web.Request) -> web.Response:
        self.slow_arrived.set()
        await self.release.wait()
        return web.Response(text="slow")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(20):
            await resp.write(b"%02d" % i + b"x" * 1022)
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp


CONFIG = """\
listen: {listen}
admin: {{listen: "127.0.0.1:0"}}
access_log: null
filters_dir: filters
cache_dir: cache
clusters:
  up: {{endpoints: ["127.0.0.1:{up}"]}}
  other: {{endpoints: ["127.0.0.1:{other}"]}}
  slow: {{endpoints: ["127.0.0.1:{up}"], timeout: 60}}
chain:
{chain}
routes:
{routes}
"""
ONE_FILTER = '  - {name: ver, module: ver.wasm, config: "A"}'
DEFAULT_ROUTES = "  - {match: {prefix: /}, cluster: up}"


class Rig:
    def __init__(self, tmp: Path, gateway: Gateway, up: Upstream, other: Upstream) -> None:
        self.tmp = tmp
        self.gateway = gateway
        self.up = up
        self.other = other
        self.url = f"http://127.0.0.1:{gateway.port}"
        self.filters = tmp / "filters"
        self.config_path = tmp / "sluice.yaml"

    @property
    def reloader(self) -> Reloader:
        assert self.gateway.reloader is not None
        return self.gateway.reloader

    def write_config(self, chain: str = ONE_FILTER, routes: str = DEFAULT_ROUTES, listen: str = "127.0.0.1:0") -> None:
        text = CONFIG.format(listen=listen, up=self.up.port, other=self.other.port, chain=chain, routes=routes)
        atomic_write(self.config_path, text.encode())

    async def get(
        self, session: aiohttp.ClientSession, path: str = "/", headers: dict[str, str] | None = None
    ) -> tuple[int, Any, bytes]:
        async with session.get(self.url + path, headers=headers) as resp:
            body = await resp.read()
            return resp.status, resp.headers, body

    async def version(self, session: aiohttp.ClientSession) -> list[str]:
        _, headers, _ = await self.get(session)
        return list(headers.getall("x-version", []))

    async def until(self, check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            await asyncio.sleep(0.02)

    async def until_version(self, session: aiohttp.ClientSession, version: str) -> None:
        async def check() -> bool:
            return await self.version(session) == [version]

        await self.until(check)

    async def until_event(self, count: int, timeout: float = 30.0) -> ReloadEvent:
        """Wait until `events` holds more than `count` entries; returns the newest."""

        async def check() -> bool:
            return len(self.reloader.events) > count

        await self.until(check, timeout)
        return self.reloader.events[-1]


@contextlib.asynccontextmanager
async def rig(tmp: Path, chain: str = ONE_FILTER, routes: str = DEFAULT_ROUTES) -> AsyncIterator[Rig]:
    up, other = Upstream("up"), Upstream("other")
    await up.start()
    await other.start()
    (tmp / "filters").mkdir()
    (tmp / "filters" / "ver.wasm").write_bytes(build_filter("1"))
    config_path = tmp / "sluice.yaml"
    config_path.write_text(
        CONFIG.format(listen="127.0.0.1:0", up=up.port, other=other.port, chain=chain, routes=routes)
    )
    gateway = Gateway(load_config(config_path))
    await gateway.start("127.0.0.1", 0)
    try:
        assert gateway.reloader is not None, "a config read from a file is watched"
        yield Rig(tmp, gateway, up, other)
    finally:
        up.release.set()
        await gateway.stop(drain_timeout=5.0)
        await up.stop()
        await other.stop()


# -- tests -----------------------------------------------------------------------------------------


def test_swaps_under_load_drop_nothing(tmp_path: Path) -> None:
    """20 swaps v1 <-> v2 under steady load on 4 keep-alive connections: no failure, no reconnect."""
    swaps = 20
    clients = 4

    async def main() -> None:
        async with rig(tmp_path) as r:
            versions: Counter[str] = Counter()
            failures: list[str] = []
            connections = [0] * clients
            done = asyncio.Event()

            async def client(index: int) -> None:
                trace = aiohttp.TraceConfig()

                async def created(*_: Any) -> None:
                    connections[index] += 1

                trace.on_connection_create_end.append(created)
                connector = aiohttp.TCPConnector(limit=1, force_close=False)
                async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
                    while not done.is_set():
                        try:
                            status, headers, body = await r.get(session)
                        except (aiohttp.ClientError, OSError) as exc:
                            failures.append(f"client {index}: {exc!r}")
                            continue
                        seen = headers.getall("x-version", [])
                        if status != 200 or body != b"up" or len(seen) != 1:
                            failures.append(f"client {index}: {status} {seen} {body[:40]!r}")
                        else:
                            versions[seen[0]] += 1

            tasks = [asyncio.create_task(client(i)) for i in range(clients)]
            async with aiohttp.ClientSession() as probe:
                for i in range(swaps):
                    version = "2" if i % 2 == 0 else "1"
                    atomic_write(r.filters / "ver.wasm", build_filter(version))
                    await r.until_version(probe, version)
            await asyncio.sleep(0.1)
            done.set()
            await asyncio.gather(*tasks)

            assert failures == []
            assert connections == [1] * clients, "every client kept its one keep-alive connection"
            assert set(versions) == {"1", "2"}
            file_events = [e for e in r.reloader.events if e.trigger == "file"]
            assert len(file_events) >= swaps and all(e.ok for e in file_events)
            assert r.reloader.last_error is None
            # Every replaced generation retired and released its VMs.
            await r.until(lambda: _true(not r.gateway.retiring))

    run(main(), timeout=240)


async def _true(value: bool) -> bool:
    return value


def test_in_flight_stream_and_paused_callout_finish_on_their_generation(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r, aiohttp.ClientSession() as session:
            old_plugin = r.gateway.generation.filters[0].plugin

            async def paused_on_callout() -> tuple[int, Any, bytes]:
                return await r.get(session, "/", headers={"x-callout": "1"})

            async def streaming() -> tuple[list[str], bytes]:
                async with aiohttp.ClientSession() as own, own.get(r.url + "/stream") as resp:
                    chunks = [chunk async for chunk in resp.content.iter_any()]
                    return list(resp.headers.getall("x-version")), b"".join(chunks)

            callout = asyncio.create_task(paused_on_callout())
            stream = asyncio.create_task(streaming())
            await asyncio.wait_for(r.up.slow_arrived.wait(), 20)
            await r.until(lambda: _true(old_plugin.report().active_streams == 2))

            atomic_write(r.filters / "ver.wasm", build_filter("2"))
            async with aiohttp.ClientSession() as probe:
                await r.until_version(probe, "2")
            assert old_plugin.report().state is not PluginState.RETIRED, "the old generation waits for its requests"
            assert old_plugin.report().vm_count == 1

            r.up.release.set()
            status, headers, body = await callout
            assert (status, headers.getall("x-version"), body) == (200, ["1"], b"up")
            versions, streamed = await stream
            assert versions == ["1"] and len(streamed) == 20 * 1024

            # Their generation retires with them: ticks stopped, VM released.
            await r.until(
                lambda: _true(old_plugin.report().state is PluginState.RETIRED and old_plugin.report().vm_count == 0)
            )
            assert old_plugin._root is not None
            assert old_plugin._root.tick_timer is None and old_plugin._root.deleted
            assert not r.gateway.retiring

    run(main(), timeout=120)


def test_half_written_module_is_never_served(tmp_path: Path) -> None:
    v1, v2 = build_filter("1", pad_to=100_000), build_filter("2", pad_to=100_000)
    good = {hashlib.sha256(v1).hexdigest(), hashlib.sha256(v2).hexdigest()}

    async def main() -> None:
        async with rig(tmp_path) as r, aiohttp.ClientSession() as session:
            atomic_write(r.filters / "ver.wasm", v1)
            await r.until(lambda: _true(r.gateway.generation.filters[0].plugin.report().module.size == len(v1)))

            # A plain copy over the old file, written slowly in chunks from another thread.
            def slow_copy() -> None:
                with open(r.filters / "ver.wasm", "wb") as out:
                    for start in range(0, len(v2), 10_000):
                        out.write(v2[start : start + 10_000])
                        out.flush()
                        time.sleep(0.01)

            writer = threading.Thread(target=slow_copy)
            writer.start()
            served: Counter[str] = Counter()
            while writer.is_alive():
                served.update(await r.version(session))
                assert r.gateway.generation.filters[0].plugin.report().module.sha256 in good
            writer.join()
            await r.until_version(session, "2")
            assert set(served) <= {"1", "2"}
            assert r.gateway.generation.filters[0].plugin.report().module.sha256 in good

            # A copy that stops half way (the writer died) is rejected; v2 keeps serving.
            before = len(r.reloader.events)
            (r.filters / "ver.wasm").write_bytes(v1[: len(v1) // 2])
            event = await r.until_event(before)
            assert not event.ok and event.trigger == "file"
            assert event.error is not None and str(r.filters / "ver.wasm") in event.error
            assert event.changed == [str(r.filters / "ver.wasm")]
            assert await r.version(session) == ["2"]

            # ... and the next good write is picked up.
            atomic_write(r.filters / "ver.wasm", v1)
            await r.until_version(session, "1")

    run(main(), timeout=120)


def test_invalid_module_keeps_the_running_version(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r, aiohttp.ClientSession() as session:
            module = r.filters / "ver.wasm"
            gen = r.gateway.generation.number

            before = len(r.reloader.events)
            atomic_write(module, b"this is not wasm at all")
            event = await r.until_event(before)
            assert not event.ok and event.generation == gen
            assert event.error == f"{module}: not a WebAssembly module (the file does not start with \\0asm)"
            assert r.reloader.last_error is event
            assert await r.version(session) == ["1"]

            # A module that instantiates but rejects its configuration is not swapped in either.
            before = len(r.reloader.events)
            atomic_write(module, build_filter("2", configure_ok=False))
            event = await r.until_event(before)
            assert not event.ok and event.error is not None
            assert event.error.startswith(f"{module}: proxy_on_configure returned false")
            assert await r.version(session) == ["1"]
            assert r.gateway.generation.number == gen

            atomic_write(module, build_filter("2"))
            await r.until_version(session, "2")
            assert r.reloader.events[-1].ok and r.reloader.events[-1].generation == r.gateway.generation.number

    run(main(), timeout=120)


def test_config_edit_reorders_chain_and_changes_routes(tmp_path: Path) -> None:
    a = '  - {name: a, module: ver.wasm, config: "a"}'
    b = '  - {name: b, module: ver.wasm, config: "b"}'

    async def main() -> None:
        async with rig(tmp_path, chain=f"{a}\n{b}") as r, aiohttp.ClientSession() as session:
            _, headers, body = await r.get(session)
            # Responses pass the chain bottom to top: b adds its header first.
            assert (headers.getall("x-config"), body) == (['b', 'a'], b"up")
            plugins = {f.name: f.plugin for f in r.gateway.generation.filters}
            old_pools = list(r.gateway.generation.clusters.values())

            before = len(r.reloader.events)
            r.write_config(chain=f"{b}\n{a}", routes="  - {match: {prefix: /}, cluster: other}")
            event = await r.until_event(before)
            assert event.ok and event.trigger == "config" and event.changed == [str(r.config_path)]
            _, headers, body = await r.get(session)
            assert (headers.getall("x-config"), body) == (['a', 'b'], b"other")
            # Unchanged filters keep their plugin (and VM state); only the order changed.
            assert {f.name: f.plugin for f in r.gateway.generation.filters} == plugins
            # New cluster pools; the old ones closed with their generation.
            assert not set(map(id, old_pools)) & set(map(id, r.gateway.generation.clusters.values()))
            await r.until(lambda: _true(not r.gateway.retiring))
            assert all(pool._closed for pool in old_pools)  # noqa: SLF001

            # A broken config is reported with file and line; the running one stays.
            before = len(r.reloader.events)
            atomic_write(r.config_path, b"listen: 127.0.0.1:0\nchain: [\n")
            event = await r.until_event(before)
            assert not event.ok and event.error is not None and f"{r.config_path}:" in event.error
            assert (await r.get(session))[2] == b"other"

            # listen cannot move without a restart: said so, the rest applies, same port serves.
            before = len(r.reloader.events)
            r.write_config(chain=a, listen="127.0.0.1:1")
            event = await r.until_event(before)
            assert event.ok
            assert any("listen" in n and "needs a restart" in n for n in event.notes), event.notes
            assert r.reloader.restart_needed == event.notes
            _, headers, body = await r.get(session)
            assert (headers.getall("x-config"), body) == (['a'], b"up")
            assert r.gateway.config.listen.port == 0

    run(main(), timeout=120)


def test_shared_data_survives_and_new_root_is_configured(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r, aiohttp.ClientSession() as session:
            _, headers, _ = await r.get(session, headers={"x-set": "kept"})
            assert headers.get("x-shared") == "kept" and headers.get("x-config") == "A"

            before = len(r.reloader.events)
            atomic_write(r.filters / "ver.wasm", build_filter("2"))
            r.write_config(chain='  - {name: ver, module: ver.wasm, config: "B"}')

            async def configured() -> bool:
                _, h, _ = await r.get(session)
                return bool(h.getall("x-version") == ["2"] and h.get("x-config") == "B")

            await r.until(configured)
            assert all(e.ok for e in list(r.reloader.events)[before:])
            _, headers, _ = await r.get(session)
            assert headers.get("x-shared") == "kept"

    run(main(), timeout=120)


def test_admin_reload_returns_the_event(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r, aiohttp.ClientSession() as session:
            assert r.reloader.events[0].trigger == "startup"
            gen = r.gateway.generation
            plugin = gen.filters[0].plugin

            event = await r.reloader.reload()
            assert event.ok and event.trigger == "admin" and event.changed == [] and event.error is None
            assert event.generation == r.gateway.generation.number == gen.number + 1
            assert r.gateway.generation.filters[0].plugin is plugin, "nothing changed: the plugin stays"
            assert r.reloader.events[-1] is event

            # The watcher may be slower than this direct write; the admin reload picks it up.
            (r.filters / "ver.wasm").write_bytes(build_filter("2"))
            event = await r.reloader.reload("admin")
            assert event.ok
            assert await r.version(session) == ["2"]

            r.config_path.write_text("listen: nowhere\n")
            event = await r.reloader.reload()
            assert not event.ok and event.error is not None and str(r.config_path) in event.error
            # (the watcher may record the same failure too)
            assert r.reloader.last_error is not None and r.reloader.last_error.error == event.error
            assert await r.version(session) == ["2"]

    run(main(), timeout=120)


def test_callout_answer_for_a_retired_root_is_dropped(tmp_path: Path) -> None:
    """A client gives up on a request paused on a callout, after a swap: the old VM is released at
    once, and the callout's late answer is dropped without calling into it."""

    async def main() -> None:
        async with rig(tmp_path) as r:
            old_plugin = r.gateway.generation.filters[0].plugin
            session = aiohttp.ClientSession()
            request = asyncio.create_task(r.get(session, "/", headers={"x-callout": "1"}))
            await asyncio.wait_for(r.up.slow_arrived.wait(), 20)
            atomic_write(r.filters / "ver.wasm", build_filter("2"))
            async with aiohttp.ClientSession() as probe:
                await r.until_version(probe, "2")
                request.cancel()
                await session.close()  # the client goes away
                await r.until(lambda: _true(old_plugin.report().vm_count == 0))
                assert old_plugin._root is not None and old_plugin._root.deleted
                calls_before = r.gateway.services.calls if r.gateway.services else 0
                r.up.release.set()  # the callout answers now, to a deleted root
                await asyncio.sleep(0.3)
                assert old_plugin.report().counters.traps == 0 and old_plugin.report().last_error is None
                assert await r.version(probe) == ["2"]
                assert calls_before == (r.gateway.services.calls if r.gateway.services else 0)
                assert not r.gateway.retiring

    run(main(), timeout=120)


def test_config_naming_a_module_not_there_yet_applies_when_it_arrives(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r, aiohttp.ClientSession() as session:
            before = len(r.reloader.events)
            r.write_config(chain=f'{ONE_FILTER}\n  - {{name: extra, module: extra.wasm, config: "X"}}')
            event = await r.until_event(before)
            assert not event.ok and event.error is not None
            assert event.error.startswith(f"{r.filters / 'extra.wasm'}: cannot read the file")
            assert (await r.get(session))[1].getall("x-config") == ["A"]

            atomic_write(r.filters / "extra.wasm", build_filter("2"))

            async def applied() -> bool:
                _, headers, _ = await r.get(session)
                return bool(headers.getall("x-config") == ["X", "A"])

            await r.until(applied)
            assert r.reloader.events[-1].ok and r.reloader.events[-1].trigger == "file"

    run(main(), timeout=120)
