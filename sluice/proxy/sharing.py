"""Which shared-data store a process's filter runtime uses (`shared_data:` in the config).

`build_runtime` is the one place that turns the config into an `abi.Runtime`: the in-process
store (the default for one worker: it is the faster one, see bench/bench_shared.py) or the
host-wide LMDB store that every worker of the host opens. `SharedDataCollector` exports the LMDB
store's size and refusals on `/stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice import abi

from .config import SharedDataBackend, SluiceConfig, resolve_workers

__all__ = ["SharedDataCollector", "build_runtime"]


def build_runtime(config: SluiceConfig, worker: str | None = None) -> abi.Runtime:
    """A filter runtime with the configured shared-data backend.

    `worker` names this process among the host's workers (queue ownership); by default its pid.
    With LMDB and a running event loop, queue wake-ups from other processes are read on that loop.
    """
    backend = config.shared_data.backend_for(resolve_workers(config.workers))
    if backend is SharedDataBackend.MEMORY:
        return abi.Runtime(cache_dir=config.cache_dir)
    settings = config.shared_data
    store = abi.LmdbStore(
        settings.lmdb_path(config.cache_dir), map_size=settings.map_size, max_keys=settings.max_keys
    )
    queues = abi.LmdbQueues(store, worker if worker is not None else f"p{os.getpid()}")
    # Without a running loop (a tool, a test) wake-ups from other processes are not read.
    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop().add_reader(queues.fileno(), queues.drain_notifications)
    return abi.Runtime(cache_dir=config.cache_dir, shared_data=abi.LmdbSharedData(store), queues=queues)


class SharedDataCollector(Collector):
    """`sluice_shared_data_*` for a runtime on the LMDB store (nothing for the in-process one)."""

    def __init__(self, runtime: Callable[[], abi.Runtime | None]) -> None:
        self.runtime = runtime
        """The runtime when there is one (a config without filters starts no wasm engine)."""

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime()
        if runtime is None:
            return
        data, queues = runtime.shared_data, runtime.queues
        if not isinstance(data, abi.LmdbSharedData):
            return
        keys = GaugeMetricFamily("sluice_shared_data_keys", "Keys in the host-wide shared data store")
        keys.add_metric([], data.entries())
        yield keys
        refused = CounterMetricFamily(
            "sluice_shared_data_refused",
            "Writes refused because the host-wide store was full (shared_data.max_keys or map_size)",
            labels=["kind"],
        )
        refused.add_metric(["data"], data.refused)
        refused.add_metric(["queue"], queues.refused if isinstance(queues, abi.LmdbQueues) else 0)
        yield refused
        errors = CounterMetricFamily(
            "sluice_shared_data_errors", "Host-wide store transactions LMDB failed (each is logged)"
        )
        errors.add_metric([], data.store.errors)
        yield errors
