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
from collections.abc import Callable
from pathlib import Path

import abi

from .clusters import ClusterPool
from .config import FilterConfig, SluiceConfig
from .routing import Router
from .server import ProxyServer, ProxyStats
from .services import Services

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
        self.server = ProxyServer(
            self._current, self.stats, max_request_header_size=config.max_request_header_size
        )
        self.address: tuple[str, int] | None = None

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
            self._runtime = abi.Runtime(cache_dir=self.config.cache_dir)
        return self._runtime

    async def build_generation(self, config: SluiceConfig) -> Generation:
        """Compile and load every filter of `config` (raises abi.PluginLoadError, naming the file).

        Compilation runs in worker threads (CPU-heavy, cached on disk); loading runs here because
        it starts VMs that call back into `Services` on this loop.
        """
        assert self.services is not None, "start() first"
        filters: list[LoadedFilter] = []
        if config.chain:
            # No filters, no wasm engine (and no epoch thread waking the process every tick).
            loop = asyncio.get_running_loop()
            runtime = self.runtime
            modules = await asyncio.gather(
                *(loop.run_in_executor(None, runtime.compile, f.module_path) for f in config.chain)
            )
            try:
                for entry, module in zip(config.chain, modules, strict=True):
                    plugin = runtime.load(entry.to_plugin_spec(), self.services, module=module)
                    filters.append(LoadedFilter(entry, plugin))
            except BaseException:
                for f in filters:
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

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """Load the config's filters and listen (default: `config.listen`; port 0 = any)."""
        self.services = Services(lambda: self._generation, asyncio.get_running_loop())
        self.install(await self.build_generation(self.config))
        self.server.access_log = self.config.access_log is not None
        listen_host = host if host is not None else self.config.listen.host
        listen_port = port if port is not None else self.config.listen.port
        self.address = await self.server.start(listen_host, listen_port)
        return self.address

    @property
    def port(self) -> int:
        assert self.address is not None
        return self.address[1]

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to `drain_timeout`), release all."""
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
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
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
    # Everything loaded so far (config, modules, VMs) lives until shutdown: keep it out of the
    # collector's scans, and collect young objects less often (requests allocate a lot of
    # short-lived ones). Both cut tail latency, not throughput.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    log.info(
        "sluice listening on %s:%d (%d filters, %d routes)", host, port, len(config.chain), len(config.routes)
    )
    await stop.wait()
    log.info("shutting down: draining in-flight requests (up to %gs)", config.drain_timeout)
    await gateway.stop(config.drain_timeout)
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
