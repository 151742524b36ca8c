"""What the host tells the proxy about one loaded filter: `Plugin.report()`.

Frozen values read at one moment. The proxy's admin API, `/stats` and `sluice filter test` read
these and nothing else of a plugin, so the host's internals (VMs, contexts, wasmtime objects) stay
private to `sluice.abi`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from sluice.histogram import HistogramSnapshot

from .types import LogLevel, MetricType


class PluginState(enum.Enum):
    OK = "ok"
    RELOADING = "reloading"
    """The VM failed (policy `reload`, or `proc_exit`): a fresh one is due once the backoff allows."""
    FAILED = "failed"
    """No usable VM: every stream gets the failure policy."""
    RETIRED = "retired"
    """Replaced by a hot reload (or shut down): serves only the streams it had."""


@dataclasses.dataclass(frozen=True, slots=True)
class ModuleInfo:
    path: str
    sha256: str
    size: int
    abi_version: str
    unknown_imports: tuple[str, ...] = ()
    """Host calls the module imports that sluice does not define (they answer UNIMPLEMENTED)."""


@dataclasses.dataclass(frozen=True, slots=True)
class FilterMetric:
    """One metric the filter defined through the ABI (`proxy_define_metric`)."""

    name: str
    type: MetricType
    value: int
    """Counter or gauge value; for a histogram the number of samples."""
    histogram: HistogramSnapshot | None = None
    """For histograms: the recorded values against `HISTOGRAM_BOUNDS`."""


@dataclasses.dataclass(frozen=True, slots=True)
class PluginCounters:
    streams: int
    callbacks: int
    traps: int
    deadlines: int
    fail_closed: int
    fail_open: int
    reloads: int
    """Fresh VMs created after a failure (policy `reload`, `proc_exit`)."""
    reload_failures: int
    refused: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Calls a capability or limit refused, by what refused them: ``capability.<name>`` or
    ``limit.<name>`` (the fields of `Capabilities` and `FilterLimits`)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PluginReport:
    name: str
    state: PluginState
    module: ModuleInfo
    counters: PluginCounters
    callback_seconds: HistogramSnapshot
    """Wall time of each call into the filter."""
    metrics: tuple[FilterMetric, ...]
    last_error: str | None
    log_level: LogLevel
    vm_count: int
    active_streams: int
    memory_bytes: int
    """Linear memory of all the filter's live VMs."""
