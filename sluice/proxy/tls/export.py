"""The admin `/certs` view and the `sluice_tls_certificate_expiry_seconds` gauge."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
