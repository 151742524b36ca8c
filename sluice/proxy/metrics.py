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
* ABI-defined metrics: one family each, see "Filter-defined metrics" below.

Filter-defined metrics (`proxy_define_metric`): each metric becomes its own family, named from
the metric's name and labelled `filter` (the chain entry), as Envoy exports each as its own stat:

* **Tags in the name** (the Istio stats plugin's encoding, which Envoy's tag extraction turns
  into labels with the regexes Istio's bootstrap configures): a name
  `<key>=.=<value>;.;<key>=.=<value>;.;<base>` (what the C++ SDK's tagged `Metric` builds with
  Istio's separators) is the family of `<base>` with a label `key="value"` per group.
* **No prefix**, as Envoy exports Wasm-defined stats (its `wasmcustom` stat namespace, which its
  Prometheus output strips): Istio's `istio_requests_total` keeps its name, the auth filter's
  `auth_allowed` is `auth_allowed_total{filter="auth"}`. A name that would join one of sluice's
  own families (all `sluice_*`) gets a type suffix instead (see Clashes).
* **Sanitizing**: every character outside `[a-zA-Z0-9_:]` becomes `_`, and a leading digit
  gets a `_` in front. Dotted tags of the C++ SDK's `Metric` class (`name.tag.value`) have no
  marker to find them by (Envoy needs configured regexes for them); sluice configures none, so
  their dots become `_` and the values stay in the name.
* **Types**: counters are exported with `_total` (a name already ending in `_total` is not
  doubled), gauges as they are, histograms as Prometheus histograms over the ABI histogram's
  bounds (`sluice.abi.metrics.HISTOGRAM_BOUNDS`, in whatever unit the filter records).
* **Clashes**: the same name from several filters (or with several tag sets) is one family with
  one sample per label set. A name whose family (or one of whose sample names) is already taken
  by a metric of another type, or by one of sluice's own families, gets the type as a suffix
  (`_counter`, `_gauge`, `_histogram`; then numbered); first come, in chain order, keeps the plain
  name. Two names that sanitize to the same series are kept apart the same way. A scrape never
  fails on a filter's choice of names.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sluice.abi import FilterMetric, MetricType, PluginReport, PluginState
from sluice.histogram import Histogram, HistogramSnapshot

from .http2.export import H2CountersCollector
from .tls.export import CertificateExpiryCollector, HandshakeCollector
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
        reports: list[tuple[str, PluginReport]] = []
        own: set[str] = set()
        for family in (*self._proxy(gw), *self._filters(gw, reports), *self._clusters(gw), *self._reloads(gw)):
            own.add(family.name)
            yield family
        # Last, so that a filter's metric never takes a name sluice's own families use.
        yield from filter_metric_families(reports, own)

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
    def _filters(self, gw: ProxyView, reports: list[tuple[str, PluginReport]]) -> Iterator[Metric]:
        """sluice's accounting of each filter; appends each filter's report to `reports`."""
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
        refused = CounterMetricFamily(
            "sluice_filter_refused",
            "Host calls a capability or limit refused, by what refused them (capability.<name>, limit.<name>)",
            labels=["filter", "by"],
        )
        vms = GaugeMetricFamily("sluice_filter_vms", "Live VMs of the filter", labels=lf)
        memory = GaugeMetricFamily("sluice_filter_memory_bytes", "Linear memory of the filter's live VMs", labels=lf)
        up = GaugeMetricFamily("sluice_filter_up", "1 when the filter state is ok", labels=lf)
        for f in filters:
            name = f.name
            report = f.report()
            reports.append((name, report))
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
            for by, count in sorted(counts.refused.items()):
                refused.add_metric([name, by], count)
            vms.add_metric([name], report.vm_count)
            memory.add_metric([name], report.memory_bytes)
            up.add_metric([name], 1 if state is PluginState.OK else 0)
        yield from (info, callbacks, streams, traps, deadlines, policy, vm_reloads, refused, vms, memory, up)

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


# -- filter-defined metrics ------------------------------------------------------------------------


_TAG = re.compile(r"([^=;.]+)=\.=(.*?);\.;")
_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
_TYPE_NAMES = {MetricType.COUNTER: "counter", MetricType.GAUGE: "gauge", MetricType.HISTOGRAM: "histogram"}


def split_tags(name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(base name, tags) of `<key>=.=<value>;.;<key>=.=<value>;.;<base>`, the names the proxy-wasm
    C++ SDK's tagged `Metric` builds with Istio's separators; any other name is its own base."""
    tags: list[tuple[str, str]] = []
    at = 0
    while (match := _TAG.match(name, at)) is not None:
        tags.append((match.group(1), match.group(2)))
        at = match.end()
    base = name[at:]
    return (base, tuple(tags)) if tags and base else (name, ())


def sanitize(text: str) -> str:
    out = _INVALID.sub("_", text)
    return f"_{out}" if not out or out[0].isdigit() else out


def family_name(base: str, mtype: MetricType) -> str:
    """The Prometheus family name of a base metric name (without a counter's `_total`)."""
    name = sanitize(base)
    if mtype is MetricType.COUNTER and name.endswith("_total"):
        name = name[: -len("_total")]
    return name


def _label(key: str) -> str:
    label = sanitize(key)
    # `filter` is ours, `le` a histogram's, `quantile` a summary's; `__*` is Prometheus's.
    return f"tag_{label}" if label in ("filter", "le", "quantile") or label.startswith("__") else label


def _sample_names(name: str, mtype: MetricType) -> tuple[str, ...]:
    if mtype is MetricType.COUNTER:
        return (name, f"{name}_total", f"{name}_created")
    if mtype is MetricType.HISTOGRAM:
        return (name, f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created")
    return (name,)


class _Families:
    def __init__(self, reserved: Iterable[str]) -> None:
        self.by_name: dict[str, tuple[MetricType, Metric]] = {}
        self.samples: dict[str, str] = {}
        """Sample name -> the family that emits it ("" for sluice's own families)."""
        self.series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        for name in reserved:
            for sample in _sample_names(name, MetricType.HISTOGRAM):
                self.samples[sample] = ""

    def _free(self, name: str, mtype: MetricType) -> bool:
        return name not in self.by_name and all(self.samples.get(s, name) == name for s in _sample_names(name, mtype))

    def family(self, base: str, mtype: MetricType, labels: dict[str, str]) -> Metric:
        """The family for one series: the plain name, else with the type as a suffix (then
        numbered, should even that be taken). A family of the same type is joined unless it
        already has a series with these labels (two names that sanitize alike)."""
        name = family_name(base, mtype)
        suffixed = f"{name}_{_TYPE_NAMES[mtype]}"
        series = tuple(sorted(labels.items()))
        candidates = itertools.chain((name, suffixed), (f"{suffixed}_{n}" for n in itertools.count(2)))
        for candidate in candidates:
            known = self.by_name.get(candidate)
            if known is not None and known[0] is mtype and (candidate, series) not in self.series:
                self.series.add((candidate, series))
                return known[1]
            if self._free(candidate, mtype):
                break
        self.series.add((candidate, series))
        metric = Metric(candidate, f"Defined by a filter through the ABI as {base!r}", _TYPE_NAMES[mtype])
        self.by_name[candidate] = (mtype, metric)
        for sample in _sample_names(candidate, mtype):
            self.samples[sample] = candidate
        return metric


def _add(metric: Metric, m: FilterMetric, labels: dict[str, str]) -> None:
    if m.type is MetricType.COUNTER:
        metric.add_sample(metric.name + "_total", labels, float(m.value))
    elif m.type is MetricType.GAUGE:
        metric.add_sample(metric.name, labels, float(m.value))
    elif m.histogram is not None:
        for bound, count in prometheus_buckets(m.histogram):
            metric.add_sample(metric.name + "_bucket", {**labels, "le": bound}, count)
        metric.add_sample(metric.name + "_count", labels, float(m.histogram.count))
        metric.add_sample(metric.name + "_sum", labels, float(m.histogram.sum))


def filter_metric_families(reports: Iterable[tuple[str, PluginReport]], reserved: Iterable[str]) -> Iterator[Metric]:
    """The families of every filter-defined metric; `reserved`: family names sluice uses itself."""
    families = _Families(reserved)
    for filter_name, report in reports:
        for m in report.metrics:
            base, tags = split_tags(m.name)
            labels = {"filter": filter_name}
            for key, value in tags:
                labels.setdefault(_label(key), value)
            _add(families.family(base, m.type, labels), m, labels)
    for _, metric in families.by_name.values():
        yield metric


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
    registry.register(CertificateExpiryCollector(lambda: [(t.name, t.tls) for t in view.tls_listeners()]))
    registry.register(HandshakeCollector(lambda: [(t.name, t.handshakes) for t in view.tls_listeners()]))
    registry.register(H2CountersCollector(lambda: [(h.name, h.counters) for h in view.http2_listeners()]))
    return registry, collector
