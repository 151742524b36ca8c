"""`Tunnel`: the byte pipe between a client and an upstream after `101 Switching Protocols`.

Bytes go through as they come, with flow control both ways (a full socket buffer on one side
stops reading on the other until it drains). A half-close is passed on; the tunnel ends when the
upstream's side ends or either connection is lost, and then both close.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .upstream import UpstreamConnection


PAUSE_TUNNEL = 4
"""The client connection's pause reason the tunnel owns (beside `downstream.PAUSE_EXCHANGE`)."""


class TunnelClient(Protocol):
    """The client connection's side of a tunnel (`downstream.DownstreamConnection`)."""

    @property
    def write_paused(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    def pause(self, reason: int) -> None: ...

    def unpause(self, reason: int) -> None: ...

    def close(self) -> None: ...


class Tunnel:
    """Joins one client connection and one upstream connection (upstream.TunnelSink)."""

    __slots__ = ("_client", "_upstream", "_on_closed", "_closed")

    def __init__(
        self, client: TunnelClient, upstream: UpstreamConnection, on_closed: Callable[[], None]
    ) -> None:
        self._client = client
        self._upstream = upstream
        self._on_closed = on_closed
        self._closed = False

    # -- client -> upstream ------------------------------------------------------------------
    def client_data(self, data: bytes) -> None:
        if self._upstream.write_raw(data):
            self._client.pause(PAUSE_TUNNEL)

    def client_eof(self) -> None:
        self._upstream.write_eof()

    def upstream_writable(self) -> None:
        self._client.unpause(PAUSE_TUNNEL)

    # -- upstream -> client ------------------------------------------------------------------
    def tunnel_data(self, data: bytes) -> None:
        self._client.write(data)
        if self._client.write_paused:
            self._upstream.pause_reading()

    def client_writable(self) -> None:
        self._upstream.resume_reading()

    def tunnel_eof(self) -> None:
        self.close()

    # -- endings -------------------------------------------------------------------------------
    def client_lost(self) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._upstream.close()
        self._client.close()
        self._on_closed()
