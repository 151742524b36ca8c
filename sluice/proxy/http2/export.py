"""The HTTP/2 counters as Prometheus metrics: `sluice_http2_<counter>_total{listener}`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .events import H2Counters

_HELP = {
    "connections": "HTTP/2 connections accepted",
    "streams": "HTTP/2 streams (requests) opened by clients",
    "resets_by_peer": "Streams the client reset",
    "protocol_errors": "Connections closed for an HTTP/2 protocol error (CONTINUATION flood included)",
    "header_list_too_large": "Connections closed for a header list above the limit",
    "rapid_reset_closes": "Connections closed for a rapid-reset flood (CVE-2023-44487)",
    "settings_flood_closes": "Connections closed for a SETTINGS flood",
    "ping_flood_closes": "Connections closed for a PING flood",
    "empty_frame_flood_closes": "Connections closed for a flood of empty DATA frames",
}


class H2CountersCollector(Collector):
    def __init__(self, listeners: Callable[[], Iterable[tuple[str, H2Counters]]]) -> None:
        self._listeners = listeners

    def collect(self) -> Iterator[Metric]:
        families = {
            f.name: CounterMetricFamily(f"sluice_http2_{f.name}", _HELP[f.name], labels=["listener"])
            for f in dataclasses.fields(H2Counters)
        }
        for listener, counters in self._listeners():
            for name, value in counters.snapshot().items():
                families[name].add_metric([listener], value)
        yield from families.values()
