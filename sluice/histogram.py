"""The one histogram sluice keeps: fixed upper bounds, per-bucket counts, a sum and a count.

Used by the host (callback times, histograms that filters define through the ABI) and by the
proxy (upstream latency). It sits below both layers and imports nothing of either.

Observing is the hot operation: on the request path it is an append to a list of pending values,
folded into the buckets in batches (`fold`, also called before any read), because bucketing every
value as it comes costs more than the whole append.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence

FOLD_EVERY = 512
"""Pending values are folded into the buckets once this many are waiting."""


@dataclasses.dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A histogram as read at one moment: what reports and exporters see."""

    bounds: tuple[float, ...]
    """Upper bounds, ascending; an implicit +Inf bucket follows the last."""
    counts: tuple[int, ...]
    """Observations per bucket (not cumulative); `len(bounds) + 1` entries, +Inf last."""
    sum: float
    count: int

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) pairs, +Inf (`math.inf`) last: Prometheus's form."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding quantile `q` (0..1); None with no observations.

        The +Inf bucket answers the largest finite bound: a dashboard wants a number."""
        if self.count == 0:
            return None
        rank = q * self.count
        for bound, running in self.cumulative():
            if running >= rank:
                return bound if bound != math.inf else (self.bounds[-1] if self.bounds else None)
        return None


class Histogram:
    """Observations against fixed upper bounds (`value <= bound` falls in that bound's bucket)."""

    __slots__ = ("bounds", "_counts", "_sum", "_count", "_pending")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        if any(b >= a for a, b in zip(self.bounds[1:], self.bounds, strict=False)):
            raise ValueError(f"histogram bounds must ascend: {self.bounds}")
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._count = 0
        self._pending: list[float] = []

    def observe(self, value: float) -> None:
        pending = self._pending
        pending.append(value)
        if len(pending) >= FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Put pending observations into their buckets."""
        pending = self._pending
        if not pending:
            return
        counts = self._counts
        bounds = self.bounds
        for value in pending:
            counts[bisect.bisect_left(bounds, value)] += 1
        self._count += len(pending)
        self._sum += math.fsum(pending)
        pending.clear()  # in place: `pending` is handed out

    def snapshot(self) -> HistogramSnapshot:
        self.fold()
        return HistogramSnapshot(self.bounds, tuple(self._counts), self._sum, self._count)

    @property
    def count(self) -> int:
        return self._count + len(self._pending)
