"""What both kinds of filter (proxy-wasm `Plugin`, `ComponentPlugin`) share: their running
counters and the `PluginReport` built from them, how a stream goes through its filter, the reply
of a stream failed closed, the schedule of VM (instance) replacement, and the callbacks of a
finished stream."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable
from typing import Protocol

from sluice.histogram import HistogramSnapshot

from .api import Cancellable, Host, LocalReply
from .report import FilterMetric, ModuleInfo, PluginCounters, PluginReport, PluginState
from .types import LogLevel

CALLBACK_BOUNDS_S: tuple[float, ...] = (
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
)
"""Upper bounds of the callback-time histogram (seconds); the report carries them."""
MAX_BACKOFF_S = 60.0
"""The longest wait between two attempts to replace a failed VM or instance."""


class Timings(Protocol):
    """Where a filter's callback times are kept (`histogram.Histogram`, `fastcall.CallbackTimes`)."""

    def snapshot(self) -> HistogramSnapshot: ...


class StreamMode(enum.Enum):
    """How a stream goes through its filter."""

    WASM = "wasm"
    """Through the filter's callbacks (a component's hooks)."""
    FAILED = "failed"
    """Failed closed: every request phase is answered with the failure reply."""
    BYPASS = "bypass"
    """Failed open: the filter is skipped."""


@dataclasses.dataclass(slots=True)
class Counters:
    """A filter's running counts; `PluginReport.counters` is their frozen copy."""

    streams: int = 0
    traps: int = 0
    deadlines: int = 0
    fail_closed: int = 0
    fail_open: int = 0
    reloads: int = 0
    reload_failures: int = 0
    refused: dict[str, int] = dataclasses.field(default_factory=dict)
    """Calls a capability or a limit refused, by `capability.<name>` / `limit.<name>`."""


def build_report(
    name: str,
    state: PluginState,
    module: ModuleInfo,
    counters: Counters,
    callback_time: Timings,
    metrics: tuple[FilterMetric, ...],
    last_error: str | None,
    log_level: LogLevel,
    *,
    vm_count: int,
    active_streams: int,
    memory_bytes: int,
) -> PluginReport:
    """The frozen report of one filter, read now (`Plugin.report`, `ComponentPlugin.report`)."""
    c = counters
    callback_seconds = callback_time.snapshot()
    return PluginReport(
        name=name,
        state=state,
        module=module,
        counters=PluginCounters(
            streams=c.streams, callbacks=callback_seconds.count, traps=c.traps, deadlines=c.deadlines,
            fail_closed=c.fail_closed, fail_open=c.fail_open, reloads=c.reloads,
            reload_failures=c.reload_failures, refused=dict(c.refused),
        ),
        callback_seconds=callback_seconds,
        metrics=metrics,
        last_error=last_error,
        log_level=log_level,
        vm_count=vm_count,
        active_streams=active_streams,
        memory_bytes=memory_bytes,
    )


class Replacement:
    """When a failed VM (or component instance) is replaced: from a host timer, never on the path
    of the request that failed (building one takes far longer than serving a request), and no
    more often than an exponential backoff allows (`reload_backoff_s` doubling to
    `MAX_BACKOFF_S`). `build` makes the fresh one and says whether it succeeded; a failed
    attempt is scheduled again."""

    __slots__ = ("_host", "_build", "_backoff", "_next_at", "_timer", "_stopped", "pending")

    def __init__(self, host: Host, backoff_s: float, build: Callable[[], bool]) -> None:
        self._host = host
        self._build = build
        self._backoff = backoff_s
        self._next_at = 0.0
        self._timer: Cancellable | None = None
        self._stopped = False
        self.pending = False
        """A replacement is due (and not yet built)."""

    def schedule(self) -> None:
        self.pending = True
        if self._timer is not None or self._stopped:
            return
        delay = max(0.0, self._next_at - time.monotonic())
        self._timer = self._host.call_later(delay, self._run)

    def stop(self) -> None:
        """Never build again (the filter is retired)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _run(self) -> None:
        self._timer = None
        if self._stopped or not self.pending:
            return
        self.pending = False
        self._next_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        if not self._build():
            self.schedule()  # again, after the (doubled) backoff


def failure_reply(name: str) -> LocalReply:
    """The local reply of a stream failed closed (`fail_closed`, `reload`)."""
    return LocalReply(503, f"filter {name} failed\n".encode(), details="wasm_fail_stream")


class _Detached:
    """The callbacks of a completed stream: events after the end go nowhere."""

    def continue_request(self) -> None: ...
    def continue_response(self) -> None: ...
    def send_local_reply(self, reply: LocalReply) -> None: ...
    def reset(self) -> None: ...


DETACHED = _Detached()
"""Stands in for a finished stream's `StreamCallbacks`."""
