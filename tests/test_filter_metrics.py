"""Filter-defined metrics as Prometheus families (sluice/proxy/metrics.py): names, Istio-style
tags, histograms, and clashes resolved without a scrape error."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sluice.abi import FilterMetric, MetricType, PluginReport
from sluice.abi.metrics import HISTOGRAM_BOUNDS
from sluice.abi.report import ModuleInfo, PluginCounters, PluginState
from sluice.histogram import Histogram
from sluice.proxy.metrics import filter_metric_families, split_tags


def report(*metrics: FilterMetric) -> PluginReport:
    empty = Histogram((1.0,)).snapshot()
    return PluginReport(
        name="f", state=PluginState.OK, module=ModuleInfo("m.wasm", "0" * 64, 1, "0.2.1"),
        counters=PluginCounters(0, 0, 0, 0, 0, 0, 0, 0), callback_seconds=empty, metrics=metrics,
        last_error=None, log_level=__import__("sluice.abi", fromlist=["LogLevel"]).LogLevel.INFO,
        vm_count=1, memory_bytes=0, active_streams=0,
    )


def scrape(reports: Iterable[tuple[str, PluginReport]], reserved: Iterable[str] = ()) -> dict[str, object]:
    class One(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield from filter_metric_families(reports, reserved)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    text = generate_latest(registry).decode()
    samples: dict[str, object] = {}
    for family in text_string_to_metric_families(text):  # a scrape parses: no duplicate families
        for s in family.samples:
            samples[s.name + str(sorted(s.labels.items()))] = (family.type, s.value)
    return samples


def c(name: str, value: int) -> FilterMetric:
    return FilterMetric(name, MetricType.COUNTER, value)


def g(name: str, value: int) -> FilterMetric:
    return FilterMetric(name, MetricType.GAUGE, value)


def test_istio_tags_become_labels() -> None:
    name = "reporter=.=destination;.;response_code=.=200;.;istio_requests_total"
    assert split_tags(name) == ("istio_requests_total", (("reporter", "destination"), ("response_code", "200")))
    # Not the encoding: kept whole (and sanitized). Values may hold dots and be empty.
    assert split_tags("a=.=b;.;") == ("a=.=b;.;", ())
    assert split_tags("x.y=.=b;.;n") == ("x.y=.=b;.;n", ())
    assert split_tags("k=.=v.1;.;e=.=;.;n") == ("n", (("k", "v.1"), ("e", "")))
    out = scrape([("stats", report(c(name, 3)))])
    key = "istio_requests_total[('filter', 'stats'), ('reporter', 'destination'), ('response_code', '200')]"
    assert out[key] == ("counter", 3.0)


def test_each_metric_its_own_family_two_filters_share_one() -> None:
    out = scrape([("a", report(c("hits", 2), g("queue.depth", 5))), ("b", report(c("hits", 7)))])
    assert out["hits_total[('filter', 'a')]"] == ("counter", 2.0)
    assert out["hits_total[('filter', 'b')]"] == ("counter", 7.0)
    assert out["queue_depth[('filter', 'a')]"] == ("gauge", 5.0)


def test_type_clashes_and_sluice_names_get_a_suffix() -> None:
    out = scrape(
        [("a", report(c("x", 1), g("sluice_filter_streams", 4))), ("b", report(g("x", 9), c("x_total", 3)))],
        reserved=["sluice_filter_streams"],
    )
    assert out["x_total[('filter', 'a')]"] == ("counter", 1.0)
    assert out["x_gauge[('filter', 'b')]"] == ("gauge", 9.0)
    # `x_total` as a counter is the family `x` already has: same type, joins it.
    assert out["x_total[('filter', 'b')]"] == ("counter", 3.0)
    assert out["sluice_filter_streams_gauge[('filter', 'a')]"] == ("gauge", 4.0)


def test_histograms_use_the_abi_bounds() -> None:
    hist = Histogram(HISTOGRAM_BOUNDS)
    for v in (3.0, 30.0, 300.0):
        hist.observe(v)
    out = scrape([("a", report(FilterMetric("latency_ms", MetricType.HISTOGRAM, 3, hist.snapshot())))])
    assert out["latency_ms_count[('filter', 'a')]"] == ("histogram", 3.0)
    assert out["latency_ms_sum[('filter', 'a')]"] == ("histogram", 333.0)
    assert out["latency_ms_bucket[('filter', 'a'), ('le', '+Inf')]"] == ("histogram", 3.0)
    buckets = [k for k in out if k.startswith("latency_ms_bucket")]
    assert len(buckets) == len(HISTOGRAM_BOUNDS) + 1


def test_reserved_label_names_and_a_third_clash() -> None:
    name = "filter=.=mine;.;le=.=5;.;code=.=200;.;calls"
    out = scrape([("a", report(c(name, 1), g("calls", 2), FilterMetric("calls_counter", MetricType.GAUGE, 3)))])
    assert out["calls_total[('code', '200'), ('filter', 'a'), ('tag_filter', 'mine'), ('tag_le', '5')]"] == (
        "counter", 1.0)
    assert out["calls_gauge[('filter', 'a')]"] == ("gauge", 2.0)
    # `calls_counter` as a gauge: its own plain name is free (the counter family is `calls`).
    assert out["calls_counter[('filter', 'a')]"] == ("gauge", 3.0)
    clash = scrape([("a", report(c("y", 1), g("y", 2), g("y_gauge", 3), FilterMetric("y", MetricType.HISTOGRAM, 0)))])
    assert clash["y_total[('filter', 'a')]"] == ("counter", 1.0)
    assert clash["y_gauge[('filter', 'a')]"] == ("gauge", 2.0)
    # `y_gauge` is a gauge family already, but holds a series with these labels: the next name.
    assert clash["y_gauge_gauge[('filter', 'a')]"] == ("gauge", 3.0)
    same = scrape([("a", report(g("a.b", 1), g("a_b", 2))), ("b", report(g("a_b", 5)))])
    assert same["a_b[('filter', 'a')]"] == ("gauge", 1.0)
    assert same["a_b_gauge[('filter', 'a')]"] == ("gauge", 2.0)
    assert same["a_b[('filter', 'b')]"] == ("gauge", 5.0)
