"""`ProxyStats`: the request-path counters the admin API and /metrics export."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from .metrics import TrafficStats


@dataclasses.dataclass
class ProxyStats:
    """Counters the admin endpoint exports. Plain ints: updated on the event loop thread only."""

    requests_total: int = 0
    requests_active: int = 0
    responses: Counter[str] = dataclasses.field(default_factory=Counter)
    """By status class: "2xx", "4xx"..."""
    local_replies: Counter[str] = dataclasses.field(default_factory=Counter)
    """By reason: no_route, upstream_connect_failure, upstream_timeout, upstream_reset,
    request_headers_too_large, request_payload_too_large, bad_request, filter (a filter's own
    reply)..."""
    rejections: Counter[str] = dataclasses.field(default_factory=Counter)
    """Requests refused for what the client sent, by reason (sluice/proxy/rejections.py); each
    is counted in `local_replies` too."""
    upstream_requests: int = 0
    upstream_retries: int = 0
    resets: Counter[str] = dataclasses.field(default_factory=Counter)
    websocket_upgrades: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    traffic: TrafficStats = dataclasses.field(default_factory=TrafficStats)
    """Requests by route, cluster and status class; upstream latency per cluster (sluice/proxy/metrics.py)."""

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "requests_active": self.requests_active,
            "responses": dict(self.responses),
            "local_replies": dict(self.local_replies),
            "rejections": dict(self.rejections),
            "upstream_requests": self.upstream_requests,
            "upstream_retries": self.upstream_retries,
            "resets": dict(self.resets),
            "websocket_upgrades": self.websocket_upgrades,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
        }


def status_class(status: int) -> str:
    return f"{status // 100}xx"
