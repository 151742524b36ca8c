"""`Generation` (one per loaded config) and `LoadedFilter` (one chain entry with its plugin).

A `Generation` is everything a request needs that comes from the config: the compiled filter
chain (FilterConfig + abi.Filter pairs), the Router and the ClusterPools. A request takes the
current generation once, when it starts, and keeps it to the end, so a reload swaps
`Gateway.generation` in one assignment and never changes the rules under a request in flight.
A replaced generation retires when its last request ends: its plugins are retired (ticks stop,
VMs are released as their last streams complete) and its idle upstream connections close.

`load_generation` builds one: it compiles every module off the loop and loads the plugins,
carrying over those of the previous generation whose entry and module bytes did not change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

from sluice import abi

from .chain import ChainEntry
from .clusters import ClusterPool
from .config import FilterConfig, SluiceConfig
from .http import path_only
from .logs import FilterLogs, variant_header
from .routing import Router

__all__ = ["Generation", "LoadedFilter", "load_generation"]

log = logging.getLogger("sluice")


@dataclasses.dataclass(eq=False)
class LoadedFilter:
    """One chain entry with its loaded plugin."""

    config: FilterConfig
    plugin: abi.Filter
    generation: int
    """Number of the generation that first served this plugin (a carried-over plugin keeps it)."""
    loaded_at: float
    """time.time() when that generation was built."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def match(self) -> str | None:
        return self.config.match

    def report(self) -> abi.PluginReport:
        """What the host says about this filter now (state, counters, histograms, metrics)."""
        return self.plugin.report()


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
        self._entries: tuple[ChainEntry, ...] = tuple((f.name, f.plugin.new_stream) for f in filters)
        """Every filter as the chain takes it, made once: a request's chain does not look them up."""
        self.on_disposed: Callable[[Generation], None] | None = None
        self.variant_header = variant_header(config.chain)
        """The request header the access log reports as `variant` (sluice/proxy/logs.py)."""

    def chain_for(self, target: str) -> tuple[ChainEntry, ...]:
        """The filters (as `FilterChain` entries) whose `match` prefix covers the path of `target`
        (its query aside; all of them when none has a prefix, without looking at the target)."""
        if self._unfiltered:
            return self._entries
        path = path_only(target)
        filters = zip(self.filters, self._entries, strict=True)
        return tuple(e for f, e in filters if f.match is None or path.startswith(f.match))

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


async def load_generation(
    number: int,
    config: SluiceConfig,
    runtime: Callable[[], abi.Runtime],
    host: abi.Host,
    previous: Generation | None = None,
) -> Generation:
    """Compile and load every filter of `config` (raises abi.PluginLoadError, naming the file).

    Compilation runs in worker threads (CPU-heavy, cached on disk); loading runs here because
    it starts VMs that call back into `host` on this loop. A filter of `previous` whose entry
    and module bytes (sha256) are unchanged keeps its Plugin (hot reload: its VM state, e.g.
    counters in linear memory, survives); retiring `previous` then must keep it (see
    `Generation.retire`). `runtime` is only called when the chain has filters: no filters, no
    wasm engine (and no epoch thread waking the process every tick).
    """
    now = time.time()
    filters: list[LoadedFilter] = []
    if config.chain:
        loop = asyncio.get_running_loop()
        engine = runtime()
        modules = await asyncio.gather(
            *(loop.run_in_executor(None, engine.compile, f.module_path) for f in config.chain)
        )
        same_node = previous is not None and (previous.config.node, previous.config.traffic_direction) == (
            config.node, config.traffic_direction
        )
        reusable = {f.name: f for f in previous.filters} if previous is not None and same_node else {}
        carried: set[int] = set()
        try:
            for entry, module in zip(config.chain, modules, strict=True):
                old = reusable.get(entry.name)
                if old is not None and old.config == entry and _reusable(old.report(), module):
                    filters.append(dataclasses.replace(old, config=entry))
                    carried.add(id(old.plugin))
                else:
                    plugin = engine.load(config.plugin_spec(entry), host, module=module)
                    filters.append(LoadedFilter(entry, plugin, number, now))
        except BaseException:
            for f in filters:
                if id(f.plugin) not in carried:
                    f.plugin.retire()
            raise
        # A new plugin starts at its entry's level; a carried-over one keeps its own (set by
        # `POST /logging` perhaps), and so does its logger.
        for f in filters:
            if id(f.plugin) not in carried:
                FilterLogs.set_level(f.name, f.plugin.report().log_level)
    clusters = {name: ClusterPool.from_config(name, c) for name, c in config.clusters.items()}
    return Generation(number, config, filters, Router(config.routes), clusters)


def _reusable(report: abi.PluginReport, module: abi.CompiledFilter) -> bool:
    return report.module.sha256 == module.sha256 and report.state is not abi.PluginState.RETIRED
