"""The running proxy: `Gateway` (one per process) and `Generation` (one per loaded config).

A `Generation` is everything a request needs that comes from the config: the compiled filter
chain (FilterConfig + abi.Plugin pairs), the Router and the ClusterPools. A request takes the
current generation once, when it starts, and keeps it to the end, so a reload swaps
`Gateway.generation` in one assignment and never changes the rules under a request in flight.
A replaced generation retires when its last request ends: its plugins are retired (ticks stop,
VMs are released as their last streams complete) and its idle upstream connections close.

`serve(config)` is the `sluice run` entry point: uvloop, signals, graceful drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import logging
import signal
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sluice import abi

from .admin import AdminServer
from .clusters import ClusterPool
from .config import FilterConfig, SluiceConfig
from .logs import variant_header
from .redis_host import RedisCollector
from .reload import Reloader
from .routing import Router
from .server import ProxyServer, ProxyStats
from .services import Services
from .sharing import SharedDataCollector, build_runtime

log = logging.getLogger("sluice")


@dataclasses.dataclass(eq=False)
class LoadedFilter:
    """One chain entry with its loaded plugin."""

    config: FilterConfig
    plugin: abi.Plugin

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def match(self) -> str | None:
        return self.config.match


_loaded: weakref.WeakKeyDictionary[abi.Plugin, tuple[int, float]] = weakref.WeakKeyDictionary()


def loaded_in(plugin: abi.Plugin) -> tuple[int, float] | None:
    """(generation number, time.time()) of the generation that first served `plugin` (admin API)."""
    return _loaded.get(plugin)


class Generation:
    """One loaded config. Immutable once built, except for its request count."""

    def __init__(
        self,
        number: int,
        config: SluiceConfig,
        filters: list[LoadedFilter],
        router: Router,
        clusters: dict[str, ClusterPool],
    ) -> None:
        self.number = number
        self.config = config
        self.filters = filters
        self.router = router
        self.clusters = clusters
        self.active = 0
        self.retired = False
        self.disposed = False
        self._keep: frozenset[int] = frozenset()
        self._unfiltered = not any(f.match for f in filters)
        self.on_disposed: Callable[[Generation], None] | None = None
        self.variant_header = variant_header(config.chain)
        """The request header the access log reports as `variant` (sluice/proxy/logs.py)."""
        now = time.time()
        for f in filters:
            _loaded.setdefault(f.plugin, (number, now))  # a plugin carried over keeps its first

    def filters_for(self, path: str) -> list[LoadedFilter]:
        """The chain entries whose `match` prefix covers `path` (all of them when none has one)."""
        if self._unfiltered:
            return self.filters
        return [f for f in self.filters if f.match is None or path.startswith(f.match)]

    # -- request accounting ------------------------------------------------------------------
    def acquire(self) -> None:
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        if self.retired and self.active == 0:
            self._dispose()

    def retire(self, keep_plugins: frozenset[int] = frozenset()) -> None:
        """No new requests will come; clean up once the in-flight ones are done.

        `keep_plugins`: ids of plugins the next generation carries over (a reload that did not
        change a filter may reuse its Plugin); those are not retired.
        """
        self.retired = True
        self._keep = keep_plugins
        if self.active == 0:
            self._dispose()

    def _dispose(self) -> None:
        if self.disposed:
            return
        self.disposed = True
        for f in self.filters:
            if id(f.plugin) not in self._keep:
                try:
                    f.plugin.retire()
                except Exception:
                    log.exception("filter %s: retire failed", f.name)
        for pool in self.clusters.values():
            pool.close()
        if self.on_disposed is not None:
            self.on_disposed(self)


class Gateway:
    """The proxy: listener, current generation, filter runtime, services, stats."""

    def __init__(self, config: SluiceConfig, *, runtime: abi.Runtime | None = None) -> None:
        self.config = config
        self.stats = ProxyStats()
        self._runtime = runtime
        self._own_runtime = runtime is None
        self._generation: Generation | None = None
        self._numbers = itertools.count(1)
        self.retiring: set[Generation] = set()
        self.services: Services | None = None
        self.server = ProxyServer(self._current, self.stats, max_request_header_size=config.max_request_header_size)
        self.address: tuple[str, int] | None = None
        self.draining = False
        self.on_drain: Callable[[], None] | None = None
        """Begins shutdown; `sluice run` sets it to what SIGTERM does. `drain()` (admin) calls it."""
        self.admin: Any = None
        """The admin listener (`proxy.admin.AdminServer`) when one runs."""
        self.reloader: Reloader | None = None
        """Hot reload (sluice/proxy/reload.py): runs when the config came from a file (`watch=True`)."""
        self.watch = config.source_path is not None

    def current_generation(self) -> Generation | None:
        """The generation serving new requests, or None before `start()`."""
        return self._generation

    def drain(self) -> None:
        """Begin graceful shutdown (`POST /drain`): /ready answers 503 from now on."""
        self.draining = True
        if self.on_drain is not None:
            self.on_drain()

    # -- generations -----------------------------------------------------------------------------
    @property
    def generation(self) -> Generation:
        if self._generation is None:
            raise RuntimeError("gateway not started")
        return self._generation

    def _current(self) -> Generation:
        return self.generation

    @property
    def runtime(self) -> abi.Runtime:
        if self._runtime is None:
            self._runtime = build_runtime(self.config)
        return self._runtime

    async def build_generation(self, config: SluiceConfig, previous: Generation | None = None) -> Generation:
        """Compile and load every filter of `config` (raises abi.PluginLoadError, naming the file).

        Compilation runs in worker threads (CPU-heavy, cached on disk); loading runs here because
        it starts VMs that call back into `Services` on this loop. A filter of `previous` whose
        entry and module bytes (sha256) are unchanged keeps its Plugin (hot reload: its VM state,
        e.g. counters in linear memory, survives); `install` then does not retire it.
        """
        assert self.services is not None, "start() first"
        self.services.redis.learn(config.clusters)  # filters may proxy_redis_init them while configuring
        filters: list[LoadedFilter] = []
        if config.chain:
            # No filters, no wasm engine (and no epoch thread waking the process every tick).
            loop = asyncio.get_running_loop()
            runtime = self.runtime
            modules = await asyncio.gather(
                *(loop.run_in_executor(None, runtime.compile, f.module_path) for f in config.chain)
            )
            reusable = {} if previous is None else {f.name: f for f in previous.filters}
            carried: set[int] = set()
            try:
                for entry, module in zip(config.chain, modules, strict=True):
                    old = reusable.get(entry.name)
                    if (
                        old is not None
                        and old.config == entry
                        and old.plugin.module.sha256 == module.sha256
                        and not old.plugin.retired
                    ):
                        plugin = old.plugin
                        carried.add(id(plugin))
                    else:
                        plugin = runtime.load(entry.to_plugin_spec(), self.services, module=module)
                    filters.append(LoadedFilter(entry, plugin))
            except BaseException:
                for f in filters:
                    if id(f.plugin) not in carried:
                        f.plugin.retire()
                raise
        clusters = {name: ClusterPool.from_config(name, c) for name, c in config.clusters.items()}
        return Generation(next(self._numbers), config, filters, Router(config.routes), clusters)

    def install(self, gen: Generation) -> Generation | None:
        """Make `gen` current (atomically for requests); retire the previous one. Returns it."""
        old, self._generation = self._generation, gen
        self.config = gen.config
        if old is not None:
            keep = frozenset(id(f.plugin) for f in gen.filters)
            self.retiring.add(old)
            old.on_disposed = self.retiring.discard
            old.retire(keep)
        return old

    def snapshot(self) -> dict[str, Any]:
        """Everything an admin endpoint shows: counters, clusters, filters, generations."""
        gen = self._generation
        out: dict[str, Any] = {"stats": self.stats.snapshot(), "generation": None}
        if gen is None:
            return out
        out["generation"] = {"number": gen.number, "active_requests": gen.active}
        out["retiring_generations"] = [{"number": g.number, "active_requests": g.active} for g in self.retiring]
        out["clusters"] = {
            name: {
                "connects": pool.connects,
                "connect_failures": pool.connect_failures,
                "reuses": pool.reuses,
                "idle_connections": pool.idle_connections(),
                "endpoints": [
                    {"address": e.label, "failures": e.failures, "healthy": e.healthy(time.monotonic())}
                    for e in pool.endpoints
                ],
            }
            for name, pool in gen.clusters.items()
        }
        out["filters"] = [
            {
                "name": f.name,
                "match": f.match,
                "state": f.plugin.state,
                "active_streams": f.plugin.active_streams,
                "vm_count": f.plugin.vm_count,
            }
            for f in gen.filters
        ]
        if self.services is not None:
            out["callouts"] = {"calls": self.services.calls, "failures": self.services.call_failures}
        return out

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """Load the config's filters and listen (default: `config.listen`; port 0 = any)."""
        self.services = Services(lambda: self._generation, asyncio.get_running_loop())
        self.install(await self.build_generation(self.config))
        self.server.access_log = self.config.access_log is not None
        listen_host = host if host is not None else self.config.listen.host
        listen_port = port if port is not None else self.config.listen.port
        self.address = await self.server.start(listen_host, listen_port)
        if self.watch and self.config.source_path is not None and self.reloader is None:
            self.reloader = Reloader(self, self.config.source_path)
            await self.reloader.start()
        return self.address

    @property
    def port(self) -> int:
        assert self.address is not None
        return self.address[1]

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to `drain_timeout`), release all."""
        self.draining = True
        if self.reloader is not None:
            await self.reloader.stop()
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        await self.server.shutdown(timeout)
        if self._generation is not None:
            self._generation.retire()
        for gen in list(self.retiring):
            gen.retire()
        if self.services is not None:
            self.services.close()
        if self._own_runtime and self._runtime is not None:
            self._runtime.close()


# -- sluice run ------------------------------------------------------------------------------------


def _setup_logging(config: SluiceConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    access = logging.getLogger("sluice.access")
    access.propagate = False
    if config.access_log is None:
        access.disabled = True
        return
    handler: logging.Handler
    if config.access_log == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    else:
        handler = logging.FileHandler(Path(config.access_log))
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)


async def _run(config: SluiceConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(config)
    try:
        host, port = await gateway.start()
    except abi.PluginLoadError as exc:
        log.error("cannot load filter: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.listen, exc.strerror or exc)
        return 1
    gateway.on_drain = stop.set  # POST /drain takes the SIGTERM path
    admin = AdminServer(gateway)
    admin.registry.register(SharedDataCollector(lambda: gateway.runtime if gateway.config.chain else None))
    admin.registry.register(RedisCollector(lambda: gateway.services.redis if gateway.services else None))
    try:
        admin_host, admin_port = await admin.start()
    except OSError as exc:
        log.error("cannot listen on %s (admin): %s", config.admin.listen, exc.strerror or exc)
        await gateway.stop(0)
        return 1
    log.info("admin API on http://%s:%d/", admin_host, admin_port)
    # Everything loaded so far (config, modules, VMs) lives until shutdown: keep it out of the
    # collector's scans, and collect young objects less often (requests allocate a lot of
    # short-lived ones). Both cut tail latency, not throughput.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    log.info("sluice listening on %s:%d (%d filters, %d routes)", host, port, len(config.chain), len(config.routes))
    await stop.wait()
    log.info("shutting down: draining in-flight requests (up to %gs)", config.drain_timeout)
    await gateway.stop(config.drain_timeout)
    await admin.stop()
    log.info("stopped")
    return 0


def serve(config: SluiceConfig) -> int:
    """Run the proxy until SIGTERM/SIGINT; drain and return the exit code."""
    _setup_logging(config)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
        return asyncio.run(_run(config))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(config))
