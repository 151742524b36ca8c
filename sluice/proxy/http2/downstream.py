"""The HTTP/2 downstream codec: bytes in, typed events out; method calls in, bytes out.

No I/O here. A driver feeds what the socket read to `receive()`, acts on the returned events,
calls the `send_*` methods for responses, and writes `data_to_send()` to the socket.

Flow control both ways:
* Request bodies: the window is reopened only by `consumed(stream_id, n)`, which the driver
  calls when whoever reads the body has taken the bytes. A client cannot make the proxy hold
  more than `initial_stream_window` per stream and `connection_window` in total.
* Response bodies: `send_data` queues; what the client's windows allow goes out at once, the
  rest waits here for WINDOW_UPDATE. `send_blocked(stream_id)` tells the driver to stop
  producing until a `StreamWritable` event, so the queue per stream stays near `send_high_water`.

Floods (counted in `H2Counters`, each ending the connection with GOAWAY ENHANCE_YOUR_CALM):
rapid reset (streams the client resets before they complete, per interval), SETTINGS, PING and
empty DATA frames per interval. A CONTINUATION flood is stopped by h2 itself (at most 64
CONTINUATION frames per header block, then a connection error) and an oversized header list
by the HPACK decoder's limit, which this codec sets to `max_header_list_size` from the start.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from .events import (
    CloseReason,
    ConnectionEnded,
    Fields,
    H2Counters,
    H2Event,
    H2Limits,
    RequestData,
    RequestHeaders,
    RequestTrailers,
    StreamReset,
    StreamWritable,
)

# RFC 9113 8.2.2: connection-specific fields must not appear in HTTP/2; an HTTP/1.1 upstream's
# response may carry them, so they are dropped on the way out rather than refused.
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
_PSEUDO_ORDER = (":method", ":path", ":authority", ":scheme")


class FloodMeter:
    """Events per fixed interval; `hit()` is True once the count passes `limit`."""

    __slots__ = ("limit", "interval", "_start", "_count")

    def __init__(self, limit: int, interval: float) -> None:
        self.limit = limit
        self.interval = interval
        self._start = -interval
        self._count = 0

    def hit(self, now: float) -> bool:
        if now - self._start >= self.interval:
            self._start = now
            self._count = 0
        self._count += 1
        return self._count > self.limit


@dataclass(slots=True)
class _Outbound:
    """Response body not yet sent, then how the stream ends."""

    chunks: collections.deque[bytes] = field(default_factory=collections.deque)
    pending: int = 0
    end_stream: bool = False
    trailers: Fields | None = None
    blocked: bool = False
    """`send_blocked` was reported true; a StreamWritable is owed when it drops."""


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def request_fields(raw: Iterable[tuple[bytes | str, bytes | str]]) -> Fields:
    """h2's request header list in the order filters see it.

    Pseudo-headers in Envoy's order, then the regular fields in arrival order; `host` becomes
    `:authority` when the client sent none (RFC 9113 8.3.1); several `cookie` fields are joined
    with "; " (RFC 9113 8.2.3) as an HTTP/1.1 upstream needs one.
    """
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    cookies: list[str] = []
    host: str | None = None
    for name_raw, value_raw in raw:
        name = _text(name_raw)
        value = _text(value_raw)
        if name.startswith(":"):
            pseudo.setdefault(name, value)
        elif name == "cookie":
            cookies.append(value)
        elif name == "host":
            host = value
        else:
            regular.append((name, value))
    if ":authority" not in pseudo and host is not None:
        pseudo[":authority"] = host
    ordered = [(name, pseudo.pop(name)) for name in _PSEUDO_ORDER if name in pseudo]
    ordered.extend(pseudo.items())  # :protocol (extended CONNECT)
    if cookies:
        regular.append(("cookie", "; ".join(cookies)))
    return (*ordered, *regular)


def _response_fields(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in headers if k.lower() not in CONNECTION_SPECIFIC]


class H2ServerConnection:
    """One downstream HTTP/2 connection (server side)."""

    def __init__(
        self,
        limits: H2Limits | None = None,
        counters: H2Counters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or H2Limits()
        self.counters = counters if counters is not None else H2Counters()
        self._clock = clock
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self._conn = h2.connection.H2Connection(config=config)
        self._conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_header_list_size,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.limits.initial_stream_window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: self.limits.max_frame_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # The decoder limit otherwise applies only once the client acknowledged our SETTINGS.
        self._conn.decoder.max_header_list_size = self.limits.max_header_list_size
        self._streams: dict[int, _Outbound] = {}
        """Streams whose response has not ended yet."""
        self._raw_out = b""
        """Frames written outside h2's state machine (the graceful GOAWAY), after h2's own."""
        self._goaway_after: int | None = None
        """Set by `goaway()`: the last stream id that is still served."""
        interval = self.limits.flood_interval_s
        self._resets = FloodMeter(self.limits.max_resets_per_interval, interval)
        self._settings = FloodMeter(self.limits.max_settings_per_interval, interval)
        self._pings = FloodMeter(self.limits.max_pings_per_interval, interval)
        self._empty = FloodMeter(self.limits.max_empty_frames_per_interval, interval)
        self.ended: ConnectionEnded | None = None
        self.counters.connections += 1

    # -- setup -----------------------------------------------------------------------------------
    def initiate(self) -> None:
        """Queue the server preface (SETTINGS) and open the connection window."""
        self._conn.initiate_connection()
        extra = self.limits.connection_window - self._conn.inbound_flow_control_window
        if extra > 0:
            self._conn.increment_flow_control_window(extra)

    def data_to_send(self) -> bytes:
        if self._raw_out:
            data, self._raw_out = self._raw_out + self._conn.data_to_send(), b""
            return data
        return self._conn.data_to_send()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # -- input -----------------------------------------------------------------------------------
    def receive(self, data: bytes) -> list[H2Event]:
        """Feed bytes read from the socket; the events they caused, in order."""
        if self.ended is not None:
            return []
        try:
            raw_events = self._conn.receive_data(data)
        except h2.exceptions.DenialOfServiceError as exc:
            # h2 already queued GOAWAY ENHANCE_YOUR_CALM.
            self.counters.header_list_too_large += 1
            return [self._end(CloseReason.HEADER_LIST_TOO_LARGE, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, str(exc))]
        except h2.exceptions.ProtocolError as exc:
            self.counters.protocol_errors += 1
            return [self._end(CloseReason.PROTOCOL_ERROR, int(exc.error_code), str(exc))]
        out: list[H2Event] = []
        now = self._clock()
        for event in raw_events:
            self._translate(event, now, out)
            if self.ended is not None:
                break
        self._flush(out)
        self._finish_drain(out)
        return out

    def _translate(self, event: h2.events.Event, now: float, out: list[H2Event]) -> None:
        if isinstance(event, h2.events.RequestReceived):
            sid = event.stream_id
            assert sid is not None and event.headers is not None
            if self._goaway_after is not None and sid > self._goaway_after:
                # Opened after our GOAWAY (the client had not seen it): not processed, may be retried.
                self._conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            self.counters.streams += 1
            self._streams[sid] = _Outbound()
            ended = event.stream_ended is not None
            out.append(RequestHeaders(sid, request_fields(event.headers), ended))
        elif isinstance(event, h2.events.DataReceived):
            sid = event.stream_id
            assert sid is not None and event.data is not None
            data = bytes(event.data)
            ended = event.stream_ended is not None
            padding = (event.flow_controlled_length or 0) - len(data)
            if padding > 0:
                self._ack(sid, padding)
            if not data and not ended:
                if self._empty.hit(now):
                    self._flood(CloseReason.EMPTY_FRAME_FLOOD, "empty DATA frames", out)
                return
            out.append(RequestData(sid, data, ended))
        elif isinstance(event, h2.events.TrailersReceived):
            assert event.stream_id is not None and event.headers is not None
            trailers = tuple((_text(k), _text(v)) for k, v in event.headers)
            out.append(RequestTrailers(event.stream_id, trailers))
        elif isinstance(event, h2.events.StreamReset):
            sid = event.stream_id
            assert sid is not None
            active = self._streams.pop(sid, None) is not None
            if event.remote_reset:
                self.counters.resets_by_peer += 1
            if active:
                out.append(StreamReset(sid, int(event.error_code or 0), bool(event.remote_reset)))
                # Resets h2 sends itself for a client's stream error count too: a client can make
                # the server reset streams as cheaply as reset them (CVE-2025-8671, "MadeYouReset").
                if self._resets.hit(now):
                    self._flood(CloseReason.RAPID_RESET, "streams reset before they completed", out)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if self._settings.hit(now):
                self._flood(CloseReason.SETTINGS_FLOOD, "SETTINGS frames", out)
        elif isinstance(event, h2.events.PingReceived):
            if self._pings.hit(now):
                self._flood(CloseReason.PING_FLOOD, "PING frames", out)
        elif isinstance(event, h2.events.WindowUpdated):
            pass  # _flush after the batch sends what the new window allows
        elif isinstance(event, h2.events.ConnectionTerminated):
            # h2 accepts no frame after a GOAWAY either way, so streams still open are lost;
            # clients send GOAWAY when they are done, so there rarely are any.
            code = int(event.error_code or 0)
            out.append(self._end(CloseReason.PEER_GOAWAY, code, "client sent GOAWAY", send=False))

    def _flood(self, reason: CloseReason, what: str, out: list[H2Event]) -> None:
        counter = {
            CloseReason.RAPID_RESET: "rapid_reset_closes",
            CloseReason.SETTINGS_FLOOD: "settings_flood_closes",
            CloseReason.PING_FLOOD: "ping_flood_closes",
            CloseReason.EMPTY_FRAME_FLOOD: "empty_frame_flood_closes",
        }[reason]
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        interval = self.limits.flood_interval_s
        detail = f"more than the allowed {what} within {interval:g}s"
        out.append(self._end(reason, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, detail))

    def _end(self, reason: CloseReason, code: int, detail: str, *, send: bool = True) -> ConnectionEnded:
        if send and self._conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            self._conn.close_connection(error_code=code, additional_data=reason.value.encode())
        ended = ConnectionEnded(reason, int(code), detail, self._conn.highest_inbound_stream_id)
        self.ended = ended
        self._streams.clear()
        return ended

    # -- request body flow control ---------------------------------------------------------------
    def consumed(self, stream_id: int, nbytes: int) -> None:
        """`nbytes` of a stream's request body were taken: reopen both windows by as much."""
        self._ack(stream_id, nbytes)

    def _ack(self, stream_id: int, nbytes: int) -> None:
        if nbytes <= 0 or self.ended is not None:
            return
        # For a stream that is gone h2 still reopens the connection window, which is what counts.
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._conn.acknowledge_received_data(nbytes, stream_id)

    # -- responses -------------------------------------------------------------------------------
    def send_response(self, stream_id: int, headers: Iterable[tuple[str, str]], end_stream: bool = False) -> None:
        """Response head: `:status` first (informational 1xx heads may precede the final one)."""
        if stream_id not in self._streams:
            return
        self._conn.send_headers(stream_id, _response_fields(headers), end_stream=end_stream)
        if end_stream:
            self._streams.pop(stream_id, None)
            self._finish_drain(None)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Queue response body; it goes out as the client's windows allow."""
        out = self._streams.get(stream_id)
        if out is None:
            return
        if data:
            out.chunks.append(data)
            out.pending += len(data)
        out.end_stream = out.end_stream or end_stream
        self._flush_stream(stream_id, out)
        self._finish_drain(None)

    def send_trailers(self, stream_id: int, trailers: Iterable[tuple[str, str]]) -> None:
        """End the response with trailers (sent once the queued body is out)."""
        out = self._streams.get(stream_id)
        if out is None:
            return
        out.trailers = tuple(_response_fields(trailers))
        out.end_stream = True
        self._flush_stream(stream_id, out)
        self._finish_drain(None)

    def send_blocked(self, stream_id: int) -> bool:
        """True while the stream's unsent body is above `send_high_water`: wait for StreamWritable."""
        out = self._streams.get(stream_id)
        if out is None or out.pending <= self.limits.send_high_water:
            return False
        out.blocked = True
        return True

    def pending_bytes(self, stream_id: int) -> int:
        """Response body queued for the stream and not yet sent."""
        out = self._streams.get(stream_id)
        return out.pending if out is not None else 0

    def reset(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        """Abort a stream (the upstream failed mid-response, say)."""
        if self._streams.pop(stream_id, None) is None or self.ended is not None:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._conn.reset_stream(stream_id, error_code)
        self._finish_drain(None)

    def stop_request(self, stream_id: int) -> None:
        """The response is complete and the rest of the request body is not wanted: RST_STREAM
        NO_ERROR asks the client to stop sending it (RFC 9113 8.1)."""
        if stream_id in self._streams or self.ended is not None:
            return  # the response has not ended: that is a reset (`reset`), not this
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def goaway(self) -> None:
        """Graceful shutdown: GOAWAY(NO_ERROR); open streams finish, then `ended` is set.

        The frame is built here rather than by h2's `close_connection`, after which h2 refuses
        every further frame, so the open streams could not finish.
        """
        if self.ended is not None or self._goaway_after is not None:
            return
        last = self._conn.highest_inbound_stream_id
        self._goaway_after = last
        frame = GoAwayFrame(0, last_stream_id=last, error_code=h2.errors.ErrorCodes.NO_ERROR)
        self._raw_out += self._conn.data_to_send() + frame.serialize()
        self._finish_drain(None)

    def _finish_drain(self, out: list[H2Event] | None) -> None:
        if self._goaway_after is None or self._streams or self.ended is not None:
            return
        ended = self._end(CloseReason.SHUTDOWN, h2.errors.ErrorCodes.NO_ERROR, "graceful shutdown", send=False)
        if out is not None:
            out.append(ended)

    # -- output flow control ---------------------------------------------------------------------
    def _flush(self, out: list[H2Event]) -> None:
        for sid, stream in list(self._streams.items()):
            if stream.pending or stream.end_stream:
                self._flush_stream(sid, stream)
            if stream.blocked and stream.pending <= self.limits.send_high_water:
                stream.blocked = False
                out.append(StreamWritable(sid))

    def _flush_stream(self, stream_id: int, out: _Outbound) -> None:
        conn = self._conn
        if self.ended is not None:
            return
        while out.chunks:
            try:
                window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError:
                self._streams.pop(stream_id, None)
                return
            if window <= 0:
                return
            chunk = out.chunks[0]
            if len(chunk) <= window:
                out.chunks.popleft()
                piece = chunk
            else:
                piece = chunk[:window]
                out.chunks[0] = chunk[window:]
            out.pending -= len(piece)
            last = not out.chunks and out.end_stream and out.trailers is None
            conn.send_data(stream_id, piece, end_stream=last)
            if last:
                self._streams.pop(stream_id, None)
                return
        if out.end_stream:
            if out.trailers is not None:
                conn.send_headers(stream_id, list(out.trailers), end_stream=True)
            else:
                conn.end_stream(stream_id)
            self._streams.pop(stream_id, None)
