"""HTTP/2 towards an upstream: one multiplexed connection per endpoint, one lease per stream.

`H2UpstreamStream` is what an exchange drives for one request, with the callback interface of
the HTTP/1.1 `UpstreamConnection` (`upstream.UpstreamLease`: `start_request`, `write_body`,
`end_request`, `pause_reading`/`resume_reading`, `detach`, `reusable`, `response_trailers`,
`close`; the response goes to a `ResponseSink`) and fails with the same errors, so the exchange
code drives either without knowing which. What differs is the lease: an HTTP/1.1 connection
carries one exchange at a time, an `H2UpstreamConnection` up to the peer's
MAX_CONCURRENT_STREAMS; `clusters.H2ClusterPool` keeps one per endpoint and replaces it when it
dies or is told to go away.

Flow control both ways. Response: received DATA is acknowledged (its window reopened) as it is
handed to the sink, except while the sink has paused reading (its client is slow): then the
acknowledgement waits for `resume_reading`, and the upstream can send at most one stream window
ahead. Request: body is sent as far as the stream's and the connection's windows allow; the rest
waits in the stream, `write_body` says "full", and `upstream_writable` follows once it is sent.

GOAWAY is taken out of the byte stream before h2 sees it (`_GoawayScanner`): h2 accepts no
frame at all after a GOAWAY, so the streams the upstream promised to finish could not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Callable, Iterable
from typing import cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from sluice.abi import HeaderMap

from ..config import format_host_port
from ..deadline import ConnectionTimer
from ..h1 import dec
from ..http import UpstreamRequest
from ..upstream import (
    ConnectFailed,
    ResponseHead,
    ResponseSink,
    UpstreamError,
    UpstreamReset,
    UpstreamTimeout,
    timeout_due,
)

# Fields that describe an HTTP/1.1 connection; RFC 9113 8.2.2 forbids them in HTTP/2.
_CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "content-length"}
)
STREAM_WINDOW = 1024 * 1024
"""What the upstream may send on one stream ahead of what its client took."""
CONNECTION_WINDOW = 4 * 1024 * 1024
_RETRYABLE_CODES = frozenset({h2.errors.ErrorCodes.REFUSED_STREAM})
_GOAWAY = 0x7
_FRAME_HEADER = 9
_LAST_STREAM_ID = 2**31 - 1000
"""Past this, a connection opens no more streams (ids are odd and never reused)."""


def request_headers(
    method: str,
    scheme: str,
    target: str,
    fields: Iterable[tuple[str, str]],
    content_length: int | None,
    accepts_trailers: bool = False,
) -> list[tuple[str, str]]:
    """HTTP/1.1-shaped request fields (with `host`) as an HTTP/2 header list (`te: trailers`
    added when the client accepts them)."""
    authority = ""
    regular: list[tuple[str, str]] = []
    for name, value in fields:
        name = name.lower()
        if name == "host":
            authority = value
        elif name == "te":
            if value.strip().lower() == "trailers":
                regular.append(("te", "trailers"))  # the only TE value HTTP/2 allows (gRPC needs it)
        elif name not in _CONNECTION_SPECIFIC and name[:1] != ":":
            regular.append((name, value))
    head = [(":method", method), (":scheme", scheme), (":authority", authority), (":path", target)]
    if method == "CONNECT":
        head = [(":method", method), (":authority", authority or target)]
    if content_length is not None:
        regular.append(("content-length", str(content_length)))
    if accepts_trailers:
        regular.append(("te", "trailers"))
    return head + regular


def _fields(raw: Iterable[tuple[bytes | str, bytes | str]]) -> list[tuple[str, str]]:
    return [
        (dec(k) if isinstance(k, bytes) else k, dec(v) if isinstance(v, bytes) else v) for k, v in raw
    ]


class _GoawayScanner:
    """Follows the frame boundaries of the bytes received and takes GOAWAY frames out.

    Every other byte passes unchanged; a read without a GOAWAY is passed on as the same object.
    A frame header split across reads (or a GOAWAY not complete yet) is held back until the rest
    comes, which h2 would have buffered anyway.
    """

    __slots__ = ("_skip", "_held")

    def __init__(self) -> None:
        self._skip = 0
        """Payload bytes of the current (non-GOAWAY) frame still to pass."""
        self._held = b""

    def feed(self, data: bytes, on_goaway: Callable[[int, int], None]) -> bytes:
        if self._held:
            data = self._held + data
            self._held = b""
        n = len(data)
        pos = self._skip
        if pos >= n:
            self._skip = pos - n
            return data
        self._skip = 0
        pieces: list[bytes] | None = None
        start = 0
        while pos < n:
            if pos + _FRAME_HEADER > n:
                self._held = data[pos:]
                break
            length = int.from_bytes(data[pos : pos + 3], "big")
            end = pos + _FRAME_HEADER + length
            if data[pos + 3] != _GOAWAY:
                if end > n:
                    self._skip = end - n
                    pos = n
                    break
                pos = end
                continue
            if end > n:
                self._held = data[pos:]
                break
            body = data[pos + _FRAME_HEADER : end]
            if pieces is None:
                pieces = []
            pieces.append(data[start:pos])
            start = end
            if len(body) >= 8:
                on_goaway(int.from_bytes(body[:4], "big") & 0x7FFFFFFF, int.from_bytes(body[4:8], "big"))
            else:
                on_goaway(0, int(h2.errors.ErrorCodes.FRAME_SIZE_ERROR))
            pos = end
        stop = pos if not self._held else n - len(self._held)
        if pieces is None:
            return data if start == 0 and stop == n else data[start:stop]
        pieces.append(data[start:stop])
        return b"".join(pieces)


class H2UpstreamStream:
    """One request/response on a stream of an `H2UpstreamConnection` (an `UpstreamLease`)."""

    __slots__ = (
        "connection", "endpoint", "tls_version", "requests", "stream_id", "_loop", "_sink", "_head",
        "_head_new", "_body", "_trailers", "_message_done", "_done_delivered", "_failed", "_dirty",
        "_request_done", "_end_pending", "_end_trailers", "_out", "_out_size", "_full", "_remaining",
        "_read_paused", "_unacked", "_timer", "_timeout", "_deadline", "_idle_timeout", "_io_at", "_released",
    )

    def __init__(self, connection: H2UpstreamConnection) -> None:
        self.connection = connection
        self.endpoint = connection.endpoint
        self.tls_version = connection.tls_version
        self.requests = 0
        """Streams its connection had started when this one started (more than 1 = reused)."""
        self.stream_id = 0
        self._loop = connection.loop
        self._sink: ResponseSink | None = None
        self._head: ResponseHead | None = None
        self._head_new = False
        self._body: list[bytes] = []
        self._trailers: HeaderMap | None = None
        self._message_done = False
        self._done_delivered = False
        self._failed = False
        self._dirty = False
        # Request side.
        self._request_done = False
        """END_STREAM (with the body or trailers) has gone to the codec."""
        self._end_pending = False
        self._end_trailers: list[tuple[str, str]] | None = None
        self._out: collections.deque[bytes] = collections.deque()
        self._out_size = 0
        self._full = False
        """`write_body` said full: `upstream_writable` is owed."""
        self._remaining: int | None = None
        self._read_paused = False
        self._unacked = 0
        """Response bytes handed on while reading was paused, not yet acknowledged."""
        self._timer = ConnectionTimer(self._loop, self._expire)
        self._timeout = 0.0
        self._deadline: float | None = None
        self._idle_timeout: float | None = None
        self._io_at = 0.0
        self._released = False

    # -- request side ----------------------------------------------------------------------------
    def start_request(
        self,
        request: UpstreamRequest,
        sink: ResponseSink,
        timeout: float | None,
        body: bytes = b"",
        end: bool = False,
        *,
        idle_timeout: float | None = None,
    ) -> bool:
        """Open the stream with the request's headers (and `body` as far as the windows allow).
        Same contract as `UpstreamConnection.start_request`; True: the body did not all fit."""
        conn = self.connection
        has_body = request.has_body
        length = request.content_length if has_body else None
        headers = request_headers(
            request.method, conn.scheme, request.target, request.fields, length, request.accepts_trailers
        )
        only_head = not has_body or (end and not body)
        self.stream_id = conn.open_stream(self, headers, only_head)
        self.requests = conn.requests
        self._sink = sink
        self._remaining = length
        self._timeout = timeout if timeout is not None else 0.0
        self._idle_timeout = idle_timeout
        if only_head:
            self._request_done = True
            self._start_response_clock()
            return False
        if body or end:
            return self.write_body(body, end)
        return False

    @property
    def write_paused(self) -> bool:
        """Request body waits for window (or the connection's socket buffer is full)."""
        return self._out_size > 0 or self.connection.write_paused

    def write_body(self, data: bytes, end: bool) -> bool:
        """Queue request body and send what the windows allow. True: not all of it went; the
        caller stops reading its source until `upstream_writable`."""
        if self._failed or self.connection.closed:
            raise UpstreamReset(f"upstream {self.endpoint} stream closed while sending the body")
        if self._request_done:
            return False
        if data:
            if self._remaining is not None:
                if len(data) > self._remaining:
                    raise UpstreamReset("request body longer than its content-length")
                self._remaining -= len(data)
            self._out.append(data)
            self._out_size += len(data)
        if end:
            if self._remaining:
                # The client sent less than it announced; the upstream would wait forever.
                self._abandon(UpstreamReset(f"request body to {self.endpoint} shorter than its content-length"))
                return False
            self._end_pending = True
        self._pump()
        full = self.write_paused
        if full:
            self._full = True
            if self._idle_timeout is not None and not self._request_done:
                self._io_at = now = self._loop.time()
                self._arm(now + self._idle_timeout)
        return full

    def end_request(self, trailers: HeaderMap | None = None) -> None:
        """The request ends (with `trailers`, sent as a HEADERS frame with END_STREAM)."""
        if self._request_done or self._end_pending or self._failed or self.connection.closed:
            return
        if self._remaining:
            self._abandon(UpstreamReset(f"request body to {self.endpoint} shorter than its content-length"))
            return
        fields = [(k, v) for k, v in trailers if k[:1] != ":"] if trailers is not None else []
        self._end_trailers = fields or None
        self._end_pending = True
        self._pump()

    def _pump(self) -> None:
        """Send queued body (and the end) as far as the windows allow."""
        codec = self.connection.codec
        sid = self.stream_id
        out = self._out
        try:
            while out:
                window = min(codec.local_flow_control_window(sid), codec.max_outbound_frame_size)
                if window <= 0:
                    break
                piece = out[0]
                if len(piece) > window:
                    out[0] = piece[window:]
                    piece = piece[:window]
                else:
                    out.popleft()
                self._out_size -= len(piece)
                last = not out and self._end_pending and self._end_trailers is None
                codec.send_data(sid, piece, end_stream=last)
                if last:
                    self._request_sent()
            if not out and self._end_pending:
                if self._end_trailers is not None:
                    codec.send_headers(sid, self._end_trailers, end_stream=True)
                else:
                    codec.end_stream(sid)
                self._request_sent()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            # The upstream reset the stream (or answered and closed it): the body has nowhere to
            # go; what the upstream said reaches the sink as events.
            out.clear()
            self._out_size = 0
            self._end_pending = False
            self._request_done = True
        self.connection.flush_soon()

    def _request_sent(self) -> None:
        self._end_pending = False
        self._end_trailers = None
        self._request_done = True
        self._start_response_clock()

    def _window_opened(self) -> None:
        """The upstream raised a window (or the socket drained): send more; owe no longer."""
        if self._out or self._end_pending:
            self._pump()
        if self._full and not self.write_paused and not self._failed:
            self._full = False
            if self._idle_timeout is not None:
                self._io_at = self._loop.time()
            sink = self._sink
            if sink is not None:
                sink.upstream_writable()

    def _start_response_clock(self) -> None:
        if self._timeout and self._head is None and self._sink is not None:
            self._deadline = at = self._loop.time() + self._timeout
            self._arm(at)

    # -- response side (driven by the connection) ------------------------------------------------
    def _on_head(self, fields: list[tuple[str, str]]) -> None:
        headers = HeaderMap()
        headers.replace_all(fields)
        status_text = headers.get(":status") or "0"
        status = int(status_text) if status_text.isdigit() else 0
        self._head = ResponseHead(status, headers, True, False)
        self._head_new = True
        self._deadline = None
        if self._idle_timeout is not None:
            self._io_at = now = self._loop.time()
            self._arm(now + self._idle_timeout)

    def _on_data(self, data: bytes, flow_controlled: int) -> None:
        if data:
            self._body.append(data)
        if self._idle_timeout is not None:
            self._io_at = self._loop.time()
        if self._read_paused or self._sink is None:
            self._unacked += flow_controlled
        else:
            self.connection.acknowledge(self.stream_id, flow_controlled)

    def _on_trailers(self, fields: list[tuple[str, str]]) -> None:
        headers = HeaderMap()
        headers.replace_all(fields)
        self._trailers = headers

    def _on_end(self) -> None:
        self._message_done = True
        self._cancel_timer_if_done()

    def _deliver(self) -> None:
        self._dirty = False
        sink = self._sink
        if sink is None or self._failed:
            return
        head = None
        if self._head_new:
            self._head_new = False
            head = self._head
        body = self._body
        data = b"".join(body) if len(body) != 1 else body[0]
        if body:
            self._body = []
        done = self._message_done and not self._done_delivered and self._head is not None
        if head is None and not data and not done:
            return
        if done:
            self._done_delivered = True
        sink.upstream_response(head, data, done)

    def _fail(self, exc: UpstreamError) -> None:
        self._timer.cancel()
        if self._failed or self._done_delivered:
            return
        self._failed = True
        self._out.clear()
        self._out_size = 0
        sink = self._sink
        if sink is not None:
            sink.upstream_failed(exc)

    def _abandon(self, exc: UpstreamError) -> None:
        """Reset the stream ourselves and tell the sink, on the next loop turn (like the
        HTTP/1.1 connection, whose close reaches the sink through `connection_lost`)."""
        self.connection.reset(self.stream_id)
        self._request_done = True
        self._loop.call_soon(self._fail, exc)

    # -- timers ----------------------------------------------------------------------------------
    def _arm(self, at: float) -> None:
        if not self._failed and not self._released:
            self._timer.arm(at)

    def _cancel_timer_if_done(self) -> None:
        if self._message_done and self._request_done:
            self._timer.cancel()

    def _idle_applies(self) -> bool:
        if self._sink is None:
            return False
        streaming = self._head is not None and not self._message_done and not self._read_paused
        return streaming or (self._full and not self._request_done)

    def _expire(self) -> None:
        if self._failed or self._released:
            return
        due = timeout_due(
            self.endpoint, self._loop.time(), self._deadline, self._timeout, self._idle_timeout, self._io_at,
            self._idle_applies(),
        )
        if isinstance(due, UpstreamTimeout):
            self._give_up(due)
        elif due is not None:
            self._arm(due)

    def _give_up(self, exc: UpstreamError) -> None:
        self.connection.reset(self.stream_id)
        self._fail(exc)

    # -- the UpstreamLease interface -------------------------------------------------------------
    @property
    def response_trailers(self) -> HeaderMap | None:
        return self._trailers

    def pause_reading(self) -> None:
        self._read_paused = True

    def resume_reading(self) -> None:
        if not self._read_paused:
            return
        self._read_paused = False
        unacked, self._unacked = self._unacked, 0
        if unacked:
            self.connection.acknowledge(self.stream_id, unacked)
        if self._idle_timeout is not None and not self._failed:
            self._io_at = now = self._loop.time()  # the pause was ours, not the upstream's
            self._arm(now + self._idle_timeout)

    @property
    def closed(self) -> bool:
        return self._failed or self._released or self.connection.closed

    @property
    def reusable(self) -> bool:
        """The exchange on this stream finished cleanly (its connection carries others anyway)."""
        return self._message_done and self._request_done and not self._failed and not self._body

    def detach(self) -> None:
        self._sink = None
        self._deadline = None
        self._idle_timeout = None
        self._timer.cancel()
        self.resume_reading()

    def close(self) -> None:
        """Abandon the exchange: reset the stream if it is still open (the connection stays)."""
        self._timer.cancel()
        if not (self._message_done and self._request_done) and not self._failed:
            self.connection.reset(self.stream_id)
        self._failed = True

    def release(self) -> None:
        """Give the stream back to its connection (the pool's `release`)."""
        if self._released:
            return
        if not self.reusable:
            self.close()
        self._released = True
        self._timer.cancel()
        unacked, self._unacked = self._unacked, 0
        if unacked:
            self.connection.acknowledge(self.stream_id, unacked)
        self.connection.release(self)


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 client connection; many concurrent streams."""

    tls_version = ""

    def __init__(self, endpoint: str, scheme: str) -> None:
        self.endpoint = endpoint
        self.scheme = scheme
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.requests = 0
        """Streams started on this connection."""
        self.codec = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self._streams: dict[int, H2UpstreamStream] = {}
        self._leased = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self.going_away = False
        self.write_paused = False
        self._flush_scheduled = False
        self._scanner = _GoawayScanner()
        self._dirty: list[H2UpstreamStream] = []
        self.on_idle: Callable[[H2UpstreamConnection], None] | None = None
        """Called when a stream is given back and none is leased (the pool may close it)."""
        self.ready: asyncio.Future[None] = self.loop.create_future()
        """Resolves once the server's SETTINGS arrived (so its stream limit is known)."""

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.codec.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self.codec.initiate_connection()
        self.codec.increment_flow_control_window(CONNECTION_WINDOW - self.codec.inbound_flow_control_window)
        self._write_out()

    def data_received(self, data: bytes) -> None:
        data = self._scanner.feed(data, self._on_goaway)
        if data:
            try:
                events = self.codec.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self._write_out()
                self._shutdown(f"upstream {self.endpoint} broke the HTTP/2 protocol: {exc}")
                return
            for event in events:
                self._on_event(event)
        # Everything one read brought reaches each stream's sink in one call.
        dirty, self._dirty = self._dirty, []
        for stream in dirty:
            stream._deliver()
        self._write_out()
        if self.going_away and not self._streams:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._shutdown(f"upstream {self.endpoint} closed the connection" + (f": {exc}" if exc else ""))

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self._streams.values()):
            if stream._full:
                stream._window_opened()

    # -- events ----------------------------------------------------------------------------------
    def _mark(self, stream: H2UpstreamStream) -> None:
        if not stream._dirty:
            stream._dirty = True
            self._dirty.append(stream)

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            sid = event.stream_id or 0
            data = event.data or b""
            stream = self._streams.get(sid)
            length = event.flow_controlled_length or 0
            if stream is None:
                self.acknowledge(sid, length)  # nobody reads it: give its connection window back
                return
            stream._on_data(data, length)
            self._mark(stream)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream._on_head(_fields(event.headers or ()))
                self._mark(stream)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream._on_end()
                self._mark(stream)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream._on_trailers(_fields(event.headers or ()))
                self._mark(stream)
        elif isinstance(event, h2.events.WindowUpdated):
            sid = event.stream_id or 0
            if sid:
                stream = self._streams.get(sid)
                if stream is not None and (stream._out or stream._end_pending or stream._full):
                    stream._window_opened()
            else:
                # The connection window grew: any stream may go on.
                for stream in list(self._streams.values()):
                    if stream._out or stream._end_pending or stream._full:
                        stream._window_opened()
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                code = int(event.error_code or 0)
                if stream._message_done and stream._head is not None:
                    # Answered in full; the reset only says the rest of the request is not wanted.
                    stream._request_done = True
                    return
                stream._fail(
                    UpstreamReset(
                        f"upstream {self.endpoint} reset the stream (error code {code})",
                        before_response=code in _RETRYABLE_CODES,
                    )
                )
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(None)
            self._wake_slots()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # Not reached for GOAWAY (taken out before h2); kept for what h2 may synthesise.
            self._on_goaway(event.last_stream_id or 0, int(event.error_code or 0))

    def _on_goaway(self, last_stream_id: int, error_code: int) -> None:
        """No new streams; those above `last_stream_id` were never processed (RFC 9113 6.8):
        they fail as retryable, the others may finish."""
        self.going_away = True
        for sid, stream in list(self._streams.items()):
            if sid > last_stream_id:
                stream._fail(
                    UpstreamReset(
                        f"upstream {self.endpoint} went away (GOAWAY, error code {error_code})",
                        before_response=True,
                    )
                )
        self._wake_slots()

    # -- used by streams -------------------------------------------------------------------------
    def open_stream(self, stream: H2UpstreamStream, headers: list[tuple[str, str]], end_stream: bool) -> int:
        if not self.usable:
            raise UpstreamReset(f"upstream {self.endpoint} connection is closed", before_response=True)
        try:
            sid = self.codec.get_next_available_stream_id()
            self.codec.send_headers(sid, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            # Too many open streams, or a header HTTP/2 cannot carry: nothing was sent.
            reason = f"upstream {self.endpoint}: cannot open a stream: {exc}"
            raise UpstreamReset(reason, before_response=True) from None
        self._streams[sid] = stream
        self.requests += 1
        self.flush_soon()
        return sid

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        if nbytes <= 0 or self._closed or stream_id <= 0:
            return
        try:
            self.codec.acknowledge_received_data(nbytes, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.flush_soon()

    def reset(self, stream_id: int) -> None:
        if self._closed or not stream_id:
            return
        try:
            self.codec.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.flush_soon()

    def flush_soon(self) -> None:
        """Write what the codec queued, once per loop iteration: the frames of every stream
        started or fed in one iteration go out in one write (one TLS record, one syscall)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._flush_scheduled = False
        data = self.codec.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- leases ----------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def usable(self) -> bool:
        """Open, not told to go away, stream ids left."""
        return not self._closed and not self.going_away and self.codec.highest_outbound_stream_id < _LAST_STREAM_ID

    @property
    def leased(self) -> int:
        return self._leased

    def has_slot(self) -> bool:
        return self._leased < self.codec.remote_settings.max_concurrent_streams

    def lease_now(self) -> H2UpstreamStream | None:
        """A stream when one is free at once (no coroutine needed), else None."""
        if not self.has_slot() or not self.usable:
            return None
        self._leased += 1
        return H2UpstreamStream(self)

    async def lease(self, timeout: float) -> H2UpstreamStream:
        """A stream for one request; waits (up to `timeout`) while the server's stream limit is
        reached, then raises ConnectFailed. Raises UpstreamReset(before_response) when the
        connection stops being usable."""
        stream = self.lease_now()
        if stream is not None:
            return stream
        if not self.has_slot():
            deadline = self.loop.time() + timeout
            while not self.has_slot() and self.usable:
                waiter: asyncio.Future[None] = self.loop.create_future()
                self._slot_waiters.append(waiter)
                try:
                    await asyncio.wait_for(waiter, max(0.0, deadline - self.loop.time()))
                except TimeoutError:
                    raise ConnectFailed(
                        f"upstream {self.endpoint}: no free HTTP/2 stream within {timeout:g}s"
                    ) from None
        if not self.usable:
            raise UpstreamReset(f"upstream {self.endpoint} connection is closed", before_response=True)
        self._leased += 1
        return H2UpstreamStream(self)

    def release(self, stream: H2UpstreamStream) -> None:
        self._leased -= 1
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
        self._wake_slots()
        if self._leased == 0:
            if self.going_away:
                self.close()
            elif self.on_idle is not None:
                self.on_idle(self)

    def _wake_slots(self) -> None:
        while self._slot_waiters and (self.has_slot() or not self.usable):
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if self.usable:
                    return

    def _shutdown(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams.values()):
            stream._fail(UpstreamReset(reason, before_response=stream._head is None))
        if not self.ready.done():
            self.ready.set_exception(ConnectFailed(reason))
            self.ready.exception()  # retrieved: nobody may be waiting
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._slot_waiters.clear()
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        """GOAWAY and close at once; streams still open fail."""
        if not self._closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.codec.close_connection()
            self._write_out()
        self._shutdown(f"upstream {self.endpoint} connection closed")


async def open_h2_connection(
    host: str,
    port: int,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> H2UpstreamConnection:
    """Connect (TLS with ALPN h2, or prior-knowledge h2c without `ssl_context`) and wait for the
    server's SETTINGS, all within `timeout`. Raises ConnectFailed."""
    loop = asyncio.get_running_loop()
    endpoint = format_host_port(host, port)
    scheme = "https" if ssl_context is not None else "http"
    started = loop.time()
    try:
        if ssl_context is None:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: H2UpstreamConnection(endpoint, scheme), host, port), timeout
            )
        else:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: H2UpstreamConnection(endpoint, scheme), host, port, ssl=ssl_context,
                    server_hostname=server_hostname or host, ssl_handshake_timeout=timeout,
                ),
                timeout,
            )
    except TimeoutError:
        raise ConnectFailed(f"connect to {endpoint} timed out after {timeout:g}s") from None
    except ssl.SSLError as exc:
        detail = getattr(exc, "verify_message", None) or exc.reason or exc
        raise ConnectFailed(f"TLS handshake with {endpoint} failed: {detail}") from None
    except OSError as exc:
        raise ConnectFailed(f"connect to {endpoint} failed: {exc.strerror or exc}") from None
    if ssl_context is not None:
        ssl_obj = transport.get_extra_info("ssl_object")
        alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
        if alpn != "h2":
            transport.close()
            raise ConnectFailed(f"upstream {endpoint} did not agree to HTTP/2 (ALPN: {alpn or 'none'})")
        protocol.tls_version = (ssl_obj.version() if ssl_obj is not None else None) or "TLS"
    try:
        await asyncio.wait_for(asyncio.shield(protocol.ready), max(0.0, timeout - (loop.time() - started)))
    except TimeoutError:
        protocol.close()
        raise ConnectFailed(f"upstream {endpoint} sent no HTTP/2 SETTINGS within {timeout:g}s") from None
    return protocol
