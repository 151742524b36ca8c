"""The typed events the HTTP/2 downstream codec emits, and its limits and counters.

Events are frozen; a driver (the asyncio protocol, later the exchange) matches on their type.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

Fields = tuple[tuple[str, str], ...]
"""Header fields in order, names lower-case, pseudo-headers first."""


class CloseReason(enum.Enum):
    """Why a connection ended. The flood reasons close with ENHANCE_YOUR_CALM."""

    PEER_GOAWAY = "peer_goaway"
    """The client sent GOAWAY (or closed the connection)."""
    PROTOCOL_ERROR = "protocol_error"
    """Frames h2 rejected: malformed headers, too many streams, a CONTINUATION flood, ..."""
    HEADER_LIST_TOO_LARGE = "header_list_too_large"
    RAPID_RESET = "rapid_reset"
    SETTINGS_FLOOD = "settings_flood"
    PING_FLOOD = "ping_flood"
    EMPTY_FRAME_FLOOD = "empty_frame_flood"
    SHUTDOWN = "shutdown"
    """We sent a graceful GOAWAY (NO_ERROR)."""


@dataclass(frozen=True, slots=True)
class RequestHeaders:
    stream_id: int
    headers: Fields
    """`:method`, `:path`, `:authority`, `:scheme` (as Envoy presents them), then the rest."""
    end_stream: bool


@dataclass(frozen=True, slots=True)
class RequestData:
    """A piece of request body. The window reopens only when the driver calls `consumed()`."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(frozen=True, slots=True)
class RequestTrailers:
    """The request's trailers; they end the request."""

    stream_id: int
    trailers: Fields


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone (the client reset it, or the codec did); stop working on it."""

    stream_id: int
    error_code: int
    by_peer: bool


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """A stream whose unsent response body was over `send_high_water` is now below it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """No new streams; after writing `data_to_send()` the driver closes the transport."""

    reason: CloseReason
    error_code: int
    detail: str
    last_stream_id: int


H2Event = RequestHeaders | RequestData | RequestTrailers | StreamReset | StreamWritable | ConnectionEnded


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Per connection. Defaults are close to Envoy's, with smaller windows (Python pays per byte)."""

    max_concurrent_streams: int = 100
    max_header_list_size: int = 64 * 1024
    """Decoded header block (names + values + 32 per field, RFC 9113); above it: GOAWAY."""
    initial_stream_window: int = 256 * 1024
    connection_window: int = 1024 * 1024
    max_frame_size: int = 16 * 1024
    send_high_water: int = 256 * 1024
    """Unsent response body per stream above which `send_blocked()` is true."""
    flood_interval_s: float = 10.0
    max_resets_per_interval: int = 200
    """Streams reset before they completed, by the client (CVE-2023-44487 rapid reset) or by h2
    for a client's stream error (CVE-2025-8671)."""
    max_settings_per_interval: int = 100
    max_pings_per_interval: int = 100
    max_empty_frames_per_interval: int = 200
    """DATA frames without data and without END_STREAM (CVE-2019-9518)."""


@dataclass(slots=True)
class H2Counters:
    """Mutable on purpose: one object can be shared by every connection of a listener."""

    connections: int = 0
    streams: int = 0
    resets_by_peer: int = 0
    protocol_errors: int = 0
    header_list_too_large: int = 0
    rapid_reset_closes: int = 0
    settings_flood_closes: int = 0
    ping_flood_closes: int = 0
    empty_frame_flood_closes: int = 0

    def snapshot(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
