"""Metrics: what the request path records (`TrafficStats`) and the Prometheus export (`SluiceCollector`).

The request path only bumps plain ints in dicts and appends to a `sluice.histogram.Histogram`
(one dict update and one list append per request); the `SluiceCollector` turns those, the
proxy's counters, every filter's `PluginReport` (host accounting and the metrics filters define
through the ABI) into Prometheus metric families when `/stats` is scraped.
Nothing is copied into prometheus_client objects ahead of time, so a scrape always shows live values
and the request path never touches a lock.

Naming scheme (see docs/admin.md):

* proxy:    ``sluice_requests_total{route,cluster,status_class}``,
            ``sluice_upstream_latency_seconds{cluster}`` (histogram), ``sluice_downstream_*``...
* filters:  ``sluice_filter_*{filter}`` from the host's own accounting (callback time histogram,
            traps, deadlines, failure-policy actions, VM reloads, VM count, linear memory);
* ABI-defined metrics keep their name as a label, never in the metric name, so any name a filter
  picks is valid: ``sluice_filter_counter_total{filter,name}``, ``sluice_filter_gauge{filter,name}``,
  ``sluice_filter_histogram{filter,name}`` (the buckets the host defines, unitless).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sluice.abi import MetricType, PluginState
from sluice.histogram import Histogram, HistogramSnapshot

from .view import ProxyView

UPSTREAM_BOUNDS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
"""Upper bounds of the upstream latency histogram (seconds)."""

NO_ROUTE = "none"
"""Route/cluster label of requests answered before routing (a filter's reply, no route...)."""


class TrafficStats:
    """Per-route and per-cluster request accounting, fed once per finished request."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        """(route, cluster, status class) -> requests."""
        self.upstream_latency: dict[str, Histogram] = {}
        """cluster -> seconds from the request's start to the upstream's response headers."""

    def observe(self, route: str, cluster: str, status: int, upstream_latency_s: float | None) -> None:
        key = (route or NO_ROUTE, cluster or NO_ROUTE, f"{status // 100}xx" if status else "none")
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if upstream_latency_s is not None and cluster:
            hist = self.upstream_latency.get(cluster)
            if hist is None:
                hist = self.upstream_latency[cluster] = Histogram(UPSTREAM_BOUNDS_S)
            hist.observe(upstream_latency_s)

    def total(self) -> int:
        return sum(self.requests.values())


def prometheus_buckets(snapshot: HistogramSnapshot) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative, `+Inf` last) of a histogram."""
    return [
        ("+Inf" if bound == math.inf else repr(float(bound)), float(count)) for bound, count in snapshot.cumulative()
    ]


class SluiceCollector(Collector):
    """Reads the proxy's live counters and its filters' reports at scrape time."""

    def __init__(self, view: ProxyView) -> None:
        self.gateway = view

    def collect(self) -> Iterator[Metric]:
        gw = self.gateway
        yield from self._proxy(gw)
        yield from self._filters(gw)
        yield from self._clusters(gw)
        yield from self._reloads(gw)

    # -- proxy -----------------------------------------------------------------------------------
    def _proxy(self, gw: ProxyView) -> Iterator[Metric]:
        stats = gw.stats
        traffic = stats.traffic
        requests = CounterMetricFamily(
            "sluice_requests", "Finished downstream requests by route, cluster and status class",
            labels=["route", "cluster", "status_class"],
        )
        for (route, cluster, status_class), count in sorted(traffic.requests.items()):
            requests.add_metric([route, cluster, status_class], count)
        yield requests

        latency = HistogramMetricFamily(
            "sluice_upstream_latency_seconds",
            "Time from a request's arrival to its upstream's response headers, by cluster",
            labels=["cluster"],
        )
        for cluster, hist in sorted(traffic.upstream_latency.items()):
            snapshot = hist.snapshot()
            latency.add_metric([cluster], prometheus_buckets(snapshot), snapshot.sum)
        yield latency

        yield CounterMetricFamily(
            "sluice_downstream_requests", "Requests accepted (including those still running)",
            value=stats.requests_total,
        )
        yield GaugeMetricFamily("sluice_downstream_requests_active", "Requests in flight", value=stats.requests_active)
        yield _labelled_counter(
            "sluice_responses", "Responses sent by status class", "status_class", stats.responses
        )
        yield _labelled_counter(
            "sluice_local_replies", "Responses made by the proxy or a filter, by reason", "reason", stats.local_replies
        )
        yield _labelled_counter(
            "sluice_rejections", "Requests refused for what the client sent, by reason", "reason", stats.rejections
        )
        yield _labelled_counter("sluice_resets", "Streams reset, by reason", "reason", stats.resets)
        yield CounterMetricFamily(
            "sluice_upstream_requests", "Requests sent upstream", value=stats.upstream_requests
        )
        yield CounterMetricFamily(
            "sluice_upstream_retries", "Requests resent after a stale keep-alive connection",
            value=stats.upstream_retries,
        )
        yield CounterMetricFamily(
            "sluice_websocket_upgrades", "Upgraded (tunnelled) connections", value=stats.websocket_upgrades
        )
        yield CounterMetricFamily(
            "sluice_downstream_received_bytes", "Request body bytes received", value=stats.bytes_received
        )
        yield CounterMetricFamily("sluice_downstream_sent_bytes", "Response body bytes sent", value=stats.bytes_sent)
        gen = gw.current_generation()
        yield GaugeMetricFamily(
            "sluice_generation", "Number of the config generation serving new requests",
            value=gen.number if gen is not None else 0,
        )
        yield GaugeMetricFamily(
            "sluice_draining", "1 while the proxy drains before shutdown", value=1 if gw.draining else 0
        )

    # -- filters ---------------------------------------------------------------------------------
    def _filters(self, gw: ProxyView) -> Iterator[Metric]:
        gen = gw.current_generation()
        filters = gen.filters if gen is not None else []
        lf = ["filter"]
        info = GaugeMetricFamily(
            "sluice_filter_info", "Loaded filters (value 1)",
            labels=["filter", "module", "sha256", "abi_version", "generation", "state"],
        )
        callbacks = HistogramMetricFamily(
            "sluice_filter_callback_seconds", "Time spent in the filter's stream callbacks (wasm)", labels=lf
        )
        streams = CounterMetricFamily("sluice_filter_streams", "Streams started through the filter", labels=lf)
        traps = CounterMetricFamily("sluice_filter_traps", "Traps in the filter's callbacks", labels=lf)
        deadlines = CounterMetricFamily("sluice_filter_deadlines", "Callbacks stopped at the CPU deadline", labels=lf)
        policy = CounterMetricFamily(
            "sluice_filter_failure_policy",
            "Streams the failure policy acted on (fail_closed: 503, fail_open: skipped)",
            labels=["filter", "action"],
        )
        vm_reloads = CounterMetricFamily(
            "sluice_filter_vm_reloads", "Fresh VMs created after a failure, by result", labels=["filter", "result"]
        )
        vms = GaugeMetricFamily("sluice_filter_vms", "Live VMs of the filter", labels=lf)
        memory = GaugeMetricFamily("sluice_filter_memory_bytes", "Linear memory of the filter's live VMs", labels=lf)
        up = GaugeMetricFamily("sluice_filter_up", "1 when the filter state is ok", labels=lf)
        counters = CounterMetricFamily(
            "sluice_filter_counter", "Counters the filter defines through the ABI", labels=["filter", "name"]
        )
        gauges = GaugeMetricFamily(
            "sluice_filter_gauge", "Gauges the filter defines through the ABI", labels=["filter", "name"]
        )
        histograms = HistogramMetricFamily(
            "sluice_filter_histogram", "Histograms the filter defines through the ABI (values as recorded)",
            labels=["filter", "name"],
        )
        for f in filters:
            name = f.name
            report = f.report()
            module = report.module
            counts = report.counters
            state = report.state
            info.add_metric([name, module.path, module.sha256, module.abi_version, str(f.generation), state.value], 1)
            callbacks.add_metric([name], prometheus_buckets(report.callback_seconds), report.callback_seconds.sum)
            streams.add_metric([name], counts.streams)
            traps.add_metric([name], counts.traps)
            deadlines.add_metric([name], counts.deadlines)
            policy.add_metric([name, "fail_closed"], counts.fail_closed)
            policy.add_metric([name, "fail_open"], counts.fail_open)
            vm_reloads.add_metric([name, "ok"], counts.reloads)
            vm_reloads.add_metric([name, "failed"], counts.reload_failures)
            vms.add_metric([name], report.vm_count)
            memory.add_metric([name], report.memory_bytes)
            up.add_metric([name], 1 if state is PluginState.OK else 0)
            for metric in report.metrics:
                if metric.type is MetricType.COUNTER:
                    counters.add_metric([name, metric.name], metric.value)
                elif metric.type is MetricType.GAUGE:
                    gauges.add_metric([name, metric.name], metric.value)
                elif metric.histogram is not None:
                    hist = metric.histogram
                    histograms.add_metric([name, metric.name], prometheus_buckets(hist), hist.sum)
        yield from (info, callbacks, streams, traps, deadlines, policy, vm_reloads, vms, memory, up)
        yield from (counters, gauges, histograms)

    # -- clusters --------------------------------------------------------------------------------
    def _clusters(self, gw: ProxyView) -> Iterator[Metric]:
        gen = gw.current_generation()
        pools = gen.clusters if gen is not None else {}
        healthy = GaugeMetricFamily(
            "sluice_cluster_endpoint_healthy", "1 unless passive health checking marked the endpoint down",
            labels=["cluster", "endpoint"],
        )
        connects = CounterMetricFamily("sluice_cluster_connects", "New upstream connections", labels=["cluster"])
        failures = CounterMetricFamily(
            "sluice_cluster_connect_failures", "Failed upstream connection attempts", labels=["cluster"]
        )
        idle = GaugeMetricFamily("sluice_cluster_idle_connections", "Idle keep-alive connections", labels=["cluster"])
        now = time.monotonic()
        for name, pool in sorted(pools.items()):
            for endpoint in pool.endpoints:
                healthy.add_metric([name, endpoint.label], 1 if endpoint.healthy(now) else 0)
            connects.add_metric([name], pool.connects)
            failures.add_metric([name], pool.connect_failures)
            idle.add_metric([name], pool.idle_connections())
        yield from (healthy, connects, failures, idle)

    # -- config reloads --------------------------------------------------------------------------
    def _reloads(self, gw: ProxyView) -> Iterator[Metric]:
        history = gw.reload_history()
        family = CounterMetricFamily("sluice_reloads", "Config/filter hot reloads, by result", labels=["result"])
        family.add_metric(["ok"], history.counts.ok if history is not None else 0)
        family.add_metric(["failed"], history.counts.failed if history is not None else 0)
        yield family


def _labelled_counter(name: str, doc: str, label: str, values: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def make_registry(view: ProxyView) -> tuple[CollectorRegistry, SluiceCollector]:
    """A registry of its own (not prometheus_client's global one) holding only sluice's collector."""
    registry = CollectorRegistry(auto_describe=False)
    collector = SluiceCollector(view)
    registry.register(collector)
    return registry, collector
