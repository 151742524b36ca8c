"""sluice.histogram: the one histogram of the host and the proxy."""

from __future__ import annotations

import math

import pytest

from sluice.histogram import FOLD_EVERY, Histogram


def test_values_fall_in_the_first_bound_they_do_not_exceed() -> None:
    hist = Histogram((1.0, 2.0, 5.0))
    for value in (0.5, 1.0, 1.5, 2.0, 4.0, 5.0, 6.0, 100.0):
        hist.observe(value)
    snap = hist.snapshot()
    assert snap.counts == (2, 2, 2, 2)
    assert snap.count == 8
    assert snap.sum == pytest.approx(120.0)
    assert snap.cumulative() == [(1.0, 2), (2.0, 4), (5.0, 6), (math.inf, 8)]


def test_pending_values_fold_in_batches_and_before_reads() -> None:
    hist = Histogram((1.0,))
    for _ in range(FOLD_EVERY - 1):
        hist.observe(0.5)
    assert hist.count == FOLD_EVERY - 1
    hist.observe(3.0)  # the batch is full: folded now
    assert hist.snapshot().counts == (FOLD_EVERY - 1, 1)


def test_quantiles_answer_bucket_bounds() -> None:
    hist = Histogram((1.0, 2.0, 5.0))
    assert hist.snapshot().quantile(0.5) is None
    for value in (0.5, 0.5, 1.5, 9.0):
        hist.observe(value)
    snap = hist.snapshot()
    assert snap.quantile(0.5) == 1.0
    assert snap.quantile(0.75) == 2.0
    assert snap.quantile(1.0) == 5.0  # +Inf answers the largest finite bound


def test_bounds_must_ascend() -> None:
    with pytest.raises(ValueError, match="ascend"):
        Histogram((2.0, 1.0))
