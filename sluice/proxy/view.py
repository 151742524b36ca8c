"""The read-only view of the running proxy that the admin API and `/stats` depend on.

`Gateway` (sluice/proxy/app.py) implements these protocols; the admin API and the Prometheus
collector are written against them, not against the gateway, so they import neither the
gateway nor the server and can be driven by anything that answers the same questions.
Filters are read through `LoadedFilter.report()` (a frozen `abi.PluginReport`), never through
the plugin's internals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from sluice.histogram import Histogram

from .config import SluiceConfig
from .generation import Generation
from .http2.events import H2Counters
from .reloadevents import ReloadHistory, ReloadSource
from .tls.acceptor import HandshakeStats
from .tls.server import ServerTls

__all__ = ["ProxyControl", "ProxyCounters", "ProxyView", "TrafficCounters"]


class TrafficCounters(Protocol):
    """Per-route and per-cluster accounting (`metrics.TrafficStats`)."""

    @property
    def requests(self) -> Mapping[tuple[str, str, str], int]:
        """(route, cluster, status class) -> finished requests."""
        ...

    @property
    def upstream_latency(self) -> Mapping[str, Histogram]:
        """cluster -> seconds from a request's start to its upstream's response headers."""
        ...


class ProxyCounters(Protocol):
    """The proxy's own counters (the server's `ProxyStats`)."""

    @property
    def requests_total(self) -> int: ...

    @property
    def requests_active(self) -> int: ...

    @property
    def responses(self) -> Mapping[str, int]:
        """By status class: "2xx", "4xx"..."""
        ...

    @property
    def local_replies(self) -> Mapping[str, int]: ...

    @property
    def rejections(self) -> Mapping[str, int]:
        """Requests refused for what the client sent, by reason (sluice/proxy/rejections.py)."""
        ...

    @property
    def resets(self) -> Mapping[str, int]: ...

    @property
    def upstream_requests(self) -> int: ...

    @property
    def upstream_retries(self) -> int: ...

    @property
    def websocket_upgrades(self) -> int: ...

    @property
    def bytes_received(self) -> int: ...

    @property
    def bytes_sent(self) -> int: ...

    @property
    def traffic(self) -> TrafficCounters: ...


class TlsListenerView(Protocol):
    """One TLS listener as the admin API and `/stats` read it (`listener.TlsListener`)."""

    @property
    def name(self) -> str: ...

    @property
    def tls(self) -> ServerTls: ...

    @property
    def handshakes(self) -> HandshakeStats: ...


class Http2ListenerView(Protocol):
    """One listener that speaks HTTP/2, as `/stats` reads it (`downstream_h2.H2Listener`)."""

    @property
    def name(self) -> str: ...

    @property
    def counters(self) -> H2Counters: ...


class ProxyView(Protocol):
    """What `/stats` and the admin API read of the running proxy."""

    def tls_listeners(self) -> Sequence[TlsListenerView]:
        """The TLS listeners (certificates, handshake counters), in `listen` order."""
        ...

    def http2_listeners(self) -> Sequence[Http2ListenerView]:
        """The listeners that speak HTTP/2 (ALPN h2 or h2c), with their HTTP/2 counters."""
        ...

    @property
    def config(self) -> SluiceConfig:
        """The config of the generation serving new requests."""
        ...

    @property
    def stats(self) -> ProxyCounters: ...

    @property
    def draining(self) -> bool: ...

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the proxy listens, once it does."""
        ...

    def current_generation(self) -> Generation | None:
        """The generation serving new requests, or None before the proxy started."""
        ...

    def retiring_generations(self) -> Sequence[Generation]:
        """Replaced generations still finishing their requests."""
        ...

    def reload_history(self) -> ReloadHistory | None:
        """Hot reload's events and counts; None when hot reload is off."""
        ...

    def suppressed_log_lines(self, filter_name: str) -> int:
        """Lines of that filter dropped by the filter log rate limit since start."""
        ...


class ProxyControl(ProxyView, Protocol):
    """`ProxyView` and the few actions the admin API takes."""

    @property
    def reloader(self) -> ReloadSource | None:
        """Hot reload, when it runs in this process (`POST /reload`)."""
        ...

    def drain(self) -> None:
        """Begin graceful shutdown (`POST /drain`)."""
        ...
