"""The admin `/certs` view, the `sluice_tls_certificate_expiry_seconds` gauge, the handshake counters."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .acceptor import HandshakeStats
from .server import ServerTls

EXPIRY_METRIC = "sluice_tls_certificate_expiry_seconds"


def certs_json(listeners: Mapping[str, ServerTls], now: datetime.datetime | None = None) -> dict[str, object]:
    """`GET /certs`: per listener, each certificate's names and expiry, and the last reload errors."""
    return {
        "listeners": [
            {
                "listener": name,
                "certificates": [
                    {**info.to_json(now), "default": position == 0}
                    for position, info in enumerate(tls.certificates)
                ],
                "errors": {str(path): error for path, error in tls.errors.items()},
            }
            for name, tls in listeners.items()
        ]
    }


class CertificateExpiryCollector(Collector):
    """Computed at scrape time so the value counts down without anyone setting it."""

    def __init__(
        self,
        listeners: Callable[[], Iterable[tuple[str, ServerTls]]],
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self._listeners = listeners
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self._clock() if self._clock is not None else None
        gauge = GaugeMetricFamily(
            EXPIRY_METRIC,
            "Seconds until the certificate's notAfter (negative once expired)",
            labels=["listener", "cert_file", "subject"],
        )
        for listener, tls in self._listeners():
            for info in tls.certificates:
                gauge.add_metric([listener, str(info.cert_file), info.subject], info.expires_in(now))
        yield gauge


class HandshakeCollector(Collector):
    """`sluice_tls_handshakes_total{listener}` and `sluice_tls_handshake_failures_total{listener, reason}`."""

    def __init__(self, listeners: Callable[[], Iterable[tuple[str, HandshakeStats]]]) -> None:
        self._listeners = listeners

    def collect(self) -> Iterator[Metric]:
        done = CounterMetricFamily("sluice_tls_handshakes", "TLS handshakes completed", labels=["listener"])
        failed = CounterMetricFamily(
            "sluice_tls_handshake_failures", "TLS handshakes that failed, by reason", labels=["listener", "reason"]
        )
        for listener, stats in self._listeners():
            done.add_metric([listener], stats.completed)
            for reason, count in sorted(stats.failed.items()):
                failed.add_metric([listener, reason], count)
        yield done
        yield failed
