"""Metrics a filter defines through the ABI (counter, gauge, histogram), with Envoy's semantics.

Metric ids carry the type in their low 2 bits (counters 4, 8...; gauges 5, 9...; histograms 6,
10...). Defining a name twice returns a new id for the same underlying metric (as Envoy); the
ids of re-definitions are kept up to a bound, oldest forgotten first, so a filter that defines
its metrics on every request does not grow the registry without end. The first id of every
metric is never forgotten. `record` on a
counter *adds* (Envoy; the spec says "sets").
"""

from __future__ import annotations

import dataclasses
from collections import deque

from sluice.histogram import Histogram

from .report import FilterMetric
from .types import MetricType, WasmResult

HISTOGRAM_BOUNDS: tuple[float, ...] = (
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000,
)


@dataclasses.dataclass
class Metric:
    name: str
    type: MetricType
    value: int = 0
    """Counter/gauge value; for histograms the number of samples."""
    histogram: Histogram | None = None
    """For histograms: the recorded values against `HISTOGRAM_BOUNDS`."""


class MetricRegistry:
    """The metrics of one plugin. Lives in the plugin, so values survive a VM reload."""

    def __init__(self) -> None:
        self._by_name: dict[tuple[str, MetricType], Metric] = {}
        self._ids: dict[int, Metric] = {}
        self._redefinitions: deque[int] = deque()
        """Ids handed out for names already defined, oldest first."""
        self._next = 0

    def define(self, mtype: int, name: str, keep_redefinitions: int = 1 << 20) -> int | None:
        """A new id for metric `name` (created on its first definition); None for a bad type.

        Beyond `keep_redefinitions` ids of re-definitions the oldest of those is forgotten
        (then NOT_FOUND): SDKs that define per request only use the latest ones."""
        if mtype not in (0, 1, 2):
            return None
        kind = MetricType(mtype)
        metric = self._by_name.get((name, kind))
        if metric is None:
            metric = Metric(name, kind)
            if kind is MetricType.HISTOGRAM:
                metric.histogram = Histogram(HISTOGRAM_BOUNDS)
            self._by_name[(name, kind)] = metric
            first = True
        else:
            first = False
        self._next += 1
        metric_id = (self._next << 2) | mtype
        self._ids[metric_id] = metric
        if not first:
            redefinitions = self._redefinitions
            redefinitions.append(metric_id)
            if len(redefinitions) > keep_redefinitions:
                del self._ids[redefinitions.popleft()]
        return metric_id

    def count(self) -> int:
        """Distinct metrics defined."""
        return len(self._by_name)

    def id_count(self) -> int:
        """Ids currently valid."""
        return len(self._ids)

    def defined(self, mtype: int, name: str) -> bool:
        return mtype in (0, 1, 2) and (name, MetricType(mtype)) in self._by_name

    def increment(self, metric_id: int, offset: int) -> WasmResult:
        metric = self._ids.get(metric_id)
        if metric is None:
            return WasmResult.NOT_FOUND
        if metric.type is MetricType.COUNTER:
            if offset <= 0:
                return WasmResult.BAD_ARGUMENT
            metric.value += offset
        elif metric.type is MetricType.GAUGE:
            metric.value += offset
        else:
            return WasmResult.BAD_ARGUMENT
        return WasmResult.OK

    def record(self, metric_id: int, value: int) -> WasmResult:
        metric = self._ids.get(metric_id)
        if metric is None:
            return WasmResult.NOT_FOUND
        if metric.type is MetricType.COUNTER:
            metric.value += value
        elif metric.type is MetricType.GAUGE:
            metric.value = value
        else:
            metric.value += 1
            assert metric.histogram is not None
            metric.histogram.observe(value)
        return WasmResult.OK

    def get(self, metric_id: int) -> int | WasmResult:
        metric = self._ids.get(metric_id)
        if metric is None:
            return WasmResult.NOT_FOUND
        if metric.type is MetricType.HISTOGRAM:
            return WasmResult.BAD_ARGUMENT
        return metric.value

    def report(self) -> tuple[FilterMetric, ...]:
        """Every metric as read now, in definition order."""
        return tuple(
            FilterMetric(m.name, m.type, m.value, m.histogram.snapshot() if m.histogram is not None else None)
            for m in self._by_name.values()
        )
