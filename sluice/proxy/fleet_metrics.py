"""Merging the workers' Prometheus exports into one (the supervisor's `/stats`).

Each worker exports its own registry (sluice/proxy/metrics.py, unchanged); the supervisor scrapes
them over their private sockets and merges by metric type:

* counters and histograms: summed per label set (the workers' histograms share bucket bounds, so
  summing buckets, `_sum` and `_count` is the exact merge); `_created` samples are dropped;
* gauges (and anything untyped): kept per worker, with a `worker` label added, because a sum is
  wrong for some (a memory high-water mark) and the per-worker view is what an operator needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = ["FleetCollector", "merge_exports"]

_SUMMED = frozenset({"counter", "histogram", "summary"})


def merge_exports(exports: Mapping[str, str]) -> list[Metric]:
    """worker label -> Prometheus text; returns merged metric families in first-seen order."""
    families: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for worker, text in exports.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                sums[family.name] = {}
            if family.type in _SUMMED:
                acc = sums[family.name]
                for s in family.samples:
                    if s.name.endswith("_created"):
                        continue
                    key = (s.name, tuple(sorted(s.labels.items())))
                    acc[key] = acc.get(key, 0.0) + s.value
            else:
                for s in family.samples:
                    merged.samples.append(Sample(s.name, {**s.labels, "worker": worker}, s.value))
    for name, acc in sums.items():
        for (sample_name, labels), value in acc.items():
            families[name].samples.append(Sample(sample_name, dict(labels), value))
    return list(families.values())


class FleetCollector(Collector):
    """Yields the metrics of the last merge plus the supervisor's own."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def set(self, metrics: Iterable[Metric]) -> None:
        self.metrics = list(metrics)

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics
