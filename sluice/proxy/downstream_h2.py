"""HTTP/2 downstream connections on the request path: every stream is one `Exchange`.

`H2ClientConnection` is the asyncio protocol a listener hands a connection to once ALPN chose
`h2` (or a plain h2c listener saw the prior-knowledge preface). It drives the sans-I/O codec
(`http2.downstream.H2ServerConnection`) and turns each stream into an exchange through the same owner
(`server.ProxyServer.begin`) and filter chain as an HTTP/1.1 request; `H2StreamClient` is that
exchange's client side (`exchange.ExchangeClient`): the stream's response goes out as HEADERS,
DATA and trailing HEADERS, and an abort resets that stream only.

Flow control both ways:
* request body: the window is reopened (`consumed`) as the exchange takes the bytes; while the
  exchange has paused the client (its upstream cannot take more), what arrives is still handed
  on (the window bounds it) but not acknowledged, so the client stops once the window is spent;
* response body: while the codec holds more unsent body for a stream than the client's windows
  let out (`send_blocked`), or the socket's buffer is full, the exchange is told the client is
  full and stops reading its upstream; `StreamWritable` (or the socket draining) resumes it.

Floods and limits are the codec's (counted per listener in `H2Counters`); each connection they
close gets one rate-limited WARN line. Streams a batch of frames opened and reset at once (the
rapid-reset pattern) never start an exchange.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import h2.errors

from sluice.abi import HeaderMap

from . import rejections
from .deadline import ConnectionTimer
from .downstream import (
    KEEPALIVE_S,
    PAUSE_EXCHANGE,
    ClientLimits,
    RequestHandler,
    RequestHead,
    ServedConnection,
    client_addresses,
)
from .h1 import HttpDate
from .http import copy_response_fields
from .http2.downstream import CONNECTION_SPECIFIC, H2ServerConnection
from .http2.events import (
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
from .rejections import Rejection
from .stats import ProxyStats
from .tls.connection import tls_connection_info

if TYPE_CHECKING:
    from .exchange import ExchangeClient
    from .listener import TlsListener
    from .upstream import TunnelSink, UpstreamConnection

PROTOCOL_VERSION = "2"
"""`RequestHead.version` of an HTTP/2 request: the exchange's `request.protocol` is `HTTP/2`."""

_QUIET_CLOSES = frozenset({CloseReason.PEER_GOAWAY, CloseReason.SHUTDOWN})


@dataclass(slots=True)
class H2Listener:
    """A listener's HTTP/2 side: its limits and the counters all its connections add to."""

    name: str
    """Where it listens (`host:port` as bound), the `listener` label of the metrics."""
    limits: H2Limits = field(default_factory=H2Limits)
    counters: H2Counters = field(default_factory=H2Counters)


class H2Owner(Protocol):
    """The listener an HTTP/2 connection belongs to (`server.ProxyServer`)."""

    stats: ProxyStats
    connections: set[ServedConnection]
    date: HttpDate

    def limits(self) -> ClientLimits: ...

    def begin(self, client: ExchangeClient, head: RequestHead) -> RequestHandler: ...

    def connection_closed(self, client: ServedConnection) -> None: ...


class H2StreamClient:
    """The client side of one stream's exchange (`exchange.ExchangeClient`)."""

    __slots__ = (
        "_conn", "stream_id", "exchange", "peer", "peer_ip", "local", "scheme", "tls_properties", "closing",
        "_paused", "_unacked", "request_ended", "started_at", "read_at",
    )

    def __init__(self, conn: H2ClientConnection, stream_id: int, now: float, request_ended: bool) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.exchange: RequestHandler | None = None
        self.peer = conn.peer
        self.peer_ip = conn.peer_ip
        self.local = conn.local
        self.scheme = conn.scheme
        self.tls_properties = conn.tls_properties
        self.closing = False
        self._paused = False
        self._unacked = 0
        """Request body handed on while paused: acknowledged (the window reopened) on unpause."""
        self.request_ended = request_ended
        self.started_at = now
        self.read_at = now
        """loop.time() of the last request body read (or of the unpause): the body idle clock."""

    # -- request body, from the connection -------------------------------------------------------
    def received(
        self, exchange: RequestHandler, data: bytes, end: bool, trailers: HeaderMap | None, now: float
    ) -> None:
        self.read_at = now
        if end:
            self.request_ended = True
        exchange.request_body(data, end, trailers)
        if data:
            if self._paused:
                self._unacked += len(data)
            else:
                self._conn.consumed(self.stream_id, len(data))

    def ack_all(self) -> None:
        unacked, self._unacked = self._unacked, 0
        if unacked:
            self._conn.consumed(self.stream_id, unacked)

    # -- ExchangeClient --------------------------------------------------------------------------
    def send_continue(self) -> None:
        pass  # an HTTP/2 request's body is never waited for (RequestHead.expect_continue is False)

    def send_response_head(
        self,
        status: int,
        headers: HeaderMap,
        body: bytes,
        *,
        whole: bool,
        sized: bool,
        body_allowed: bool,
        keep_alive: bool,
        request_done: bool,
        length_may_change: bool = False,
    ) -> bool:
        fields: list[tuple[str, str]] = [(":status", str(status))]
        # As over HTTP/1.1: Content-Length from the body sent, or none when a filter may change
        # a streamed body's length; HTTP/1.1's connection fields never go into HTTP/2.
        has_length, has_server, has_date = copy_response_fields(
            headers, fields, CONNECTION_SPECIFIC, sized or length_may_change
        )
        if whole and (sized or not has_length) and status not in (204, 304) and not 100 <= status < 200:
            fields.append(("content-length", str(len(body))))
        if not has_server:
            fields.append(("server", "sluice"))
        if not has_date:
            fields.append(("date", self._conn.date.now()))
        codec = self._conn.codec
        sid = self.stream_id
        if whole and body and body_allowed:
            codec.send_response(sid, fields, end_stream=False)
            codec.send_data(sid, body, end_stream=True)
        else:
            codec.send_response(sid, fields, end_stream=whole)
        self._conn.flush()
        return True  # the connection's life is not this stream's business

    def send_response_data(self, data: bytes, end: bool, trailers: HeaderMap | None) -> bool:
        conn = self._conn
        codec = conn.codec
        sid = self.stream_id
        fields = [(k, v) for k, v in trailers if k[0] != ":"] if end and trailers is not None else None
        if fields:
            if data:
                codec.send_data(sid, data, end_stream=False)
            codec.send_trailers(sid, fields)
        else:
            codec.send_data(sid, data, end_stream=end)
        conn.flush()
        return not end and (codec.send_blocked(sid) or conn.write_paused)

    def start_tunnel(
        self, headers: HeaderMap, upstream: UpstreamConnection, on_closed: Callable[[], None]
    ) -> TunnelSink | None:
        return None  # an HTTP/2 request is never an upgrade (RequestHead.upgrade is False)

    def pause(self, reason: int = PAUSE_EXCHANGE) -> None:
        self._paused = True

    def unpause(self, reason: int = PAUSE_EXCHANGE) -> None:
        if self._paused:
            self._paused = False
            self.read_at = self._conn.now()  # the time the proxy held the client does not count
            self.ack_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def abort(self) -> None:
        """Reset this stream; the connection and its other streams go on."""
        self._conn.reset_stream(self)

    def exchange_done(self, exchange: RequestHandler, keep_alive: bool) -> None:
        self._conn.stream_done(self)


class H2ClientConnection(asyncio.Protocol):
    """One HTTP/2 client connection of the proxy listener."""

    def __init__(self, server: H2Owner, listener: H2Listener, tls: TlsListener | None = None) -> None:
        self.server = server
        self.date = server.date
        self.listener = listener
        self.codec = H2ServerConnection(listener.limits, listener.counters)
        self._tls = tls
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown:0"
        self.peer_ip = "unknown"
        self.local = "unknown:0"
        self.scheme = "http"
        self.tls_properties: dict[str, str | bool] | None = None
        self.write_paused = False
        self.streams: dict[int, H2StreamClient] = {}
        """Streams whose exchange has not ended."""
        self.ended: ConnectionEnded | None = None
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._idle_since: float | None = None
        self._timer = ConnectionTimer(self._loop, self._check_timers)
        self._limits = server.limits()

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer, self.peer_ip, self.local = client_addresses(transport)
        ssl_obj = transport.get_extra_info("ssl_object")
        if isinstance(ssl_obj, ssl.SSLObject | ssl.SSLSocket):
            self.scheme = "https"
            if self._tls is not None:
                info = tls_connection_info(ssl_obj, self._tls.tls.requested_server_name(ssl_obj))
                self.tls_properties = info.properties()
        self.server.connections.add(self)
        self.codec.initiate()
        self._write_out()
        self._idle_since = now = self._loop.time()
        self._timer.arm(now + KEEPALIVE_S)

    def data_received(self, data: bytes) -> None:
        self._dispatch(self.codec.receive(data))
        self._write_out()

    def eof_received(self) -> bool | None:
        return None  # a client's EOF ends the connection; streams in flight are client disconnects

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._timer.cancel()
        self.server.connection_closed(self)
        self._lose_streams()

    def pause_writing(self) -> None:
        # A client that does not read must not make us queue PING and SETTINGS acknowledgements.
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
        for stream in list(self.streams.values()):
            if stream.exchange is not None:
                stream.exchange.client_writable()

    # -- events from the codec -------------------------------------------------------------------
    def _dispatch(self, events: list[H2Event]) -> None:
        # Streams this batch both opens and resets (or a batch that ends the connection): no
        # exchange starts for them; it would only be torn down again (rapid reset).
        doomed: set[int] = set()
        if len(events) > 1:
            for event in events:
                if type(event) is StreamReset:
                    doomed.add(event.stream_id)
                elif type(event) is ConnectionEnded:
                    doomed.update(e.stream_id for e in events if type(e) is RequestHeaders)
        now = self._loop.time()
        for event in events:
            kind = type(event)
            if kind is RequestHeaders:
                assert isinstance(event, RequestHeaders)
                if event.stream_id not in doomed:
                    self._begin(event.stream_id, event.headers, event.end_stream, now)
            elif kind is RequestData:
                assert isinstance(event, RequestData)
                stream = self.streams.get(event.stream_id)
                if stream is None or stream.exchange is None:
                    self.codec.consumed(event.stream_id, len(event.data))  # nobody reads it
                else:
                    stream.received(stream.exchange, event.data, event.end_stream, None, now)
            elif kind is RequestTrailers:
                assert isinstance(event, RequestTrailers)
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.exchange is not None:
                    stream.received(stream.exchange, b"", True, HeaderMap(list(event.trailers)), now)
            elif kind is StreamReset:
                assert isinstance(event, StreamReset)
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    stream.ack_all()
                    if stream.exchange is not None:
                        stream.exchange.client_gone()
                    self._maybe_idle()
            elif kind is StreamWritable:
                assert isinstance(event, StreamWritable)
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.exchange is not None:
                    stream.exchange.client_writable()
            elif kind is ConnectionEnded:
                assert isinstance(event, ConnectionEnded)
                self._ended(event)

    def _begin(self, stream_id: int, fields: Fields, end_stream: bool, now: float) -> None:
        method = path = ""
        authority: str | None = None
        regular: list[tuple[str, str]] = []
        for name, value in fields:
            if name[0] != ":":
                regular.append((name, value))
            elif name == ":method":
                method = value
            elif name == ":path":
                path = value
            elif name == ":authority":
                authority = value
            elif name == ":protocol":
                method = "CONNECT"  # extended CONNECT (RFC 8441): no tunnels here either
        if method == "CONNECT":
            self._refuse(stream_id, Rejection.METHOD_NOT_ALLOWED)
            return
        if authority is not None:
            # `:authority` is the exchange's Host: it becomes the filters' `:authority` again.
            regular.insert(0, ("host", authority))
        head = RequestHead(method, path, PROTOCOL_VERSION, regular, True, not end_stream, False)
        stream = H2StreamClient(self, stream_id, now, end_stream)
        self.streams[stream_id] = stream
        self._idle_since = None
        self._limits = limits = self.server.limits()
        if limits.stream_timeout is not None:
            self._timer.arm(now + limits.stream_timeout)
        if not end_stream:
            self._timer.arm(now + limits.body_idle)
        if self.ended is not None:
            stream.closing = True
        exchange = stream.exchange = self.server.begin(stream, head)
        exchange.start(b"", end_stream, None)

    def _refuse(self, stream_id: int, rejection: Rejection) -> None:
        """A request the proxy does not serve: counted, logged, sluice's own reply on the stream."""
        stats = self.server.stats
        rejections.count(stats, rejection, self.peer)
        stats.responses[f"{rejection.status // 100}xx"] += 1
        body = rejection.body
        fields = [
            (":status", str(rejection.status)),
            ("content-type", "text/plain"),
            ("content-length", str(len(body))),
            ("server", "sluice"),
            ("date", self.date.now()),
        ]
        self.codec.send_response(stream_id, fields, end_stream=False)
        self.codec.send_data(stream_id, body, end_stream=True)

    def _ended(self, event: ConnectionEnded) -> None:
        if self.ended is not None:
            return
        self.ended = event
        if event.reason not in _QUIET_CLOSES:
            rejections.warn(f"client {self.peer}: HTTP/2 connection closed: {event.reason.value}: {event.detail}")
        self._lose_streams()

    def _lose_streams(self) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            if stream.exchange is not None:
                stream.exchange.client_gone()

    # -- driven by the streams -------------------------------------------------------------------
    def consumed(self, stream_id: int, nbytes: int) -> None:
        self.codec.consumed(stream_id, nbytes)
        self.flush()

    def reset_stream(self, stream: H2StreamClient) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            stream.ack_all()
            self.codec.reset(stream.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.flush()
            self._maybe_idle()

    def stream_done(self, stream: H2StreamClient) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            stream.ack_all()
            if not stream.request_ended:
                # Answered before the request body ended: the client may stop sending it (RFC 9113 8.1).
                self.codec.stop_request(stream.stream_id)
            self.flush()
            self._maybe_idle()

    # -- writing ---------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what the codec queued, once per loop iteration: every stream's frames of one
        iteration in one write (on TLS each write is a record and a syscall)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._flush_scheduled = False
        codec = self.codec
        data = codec.data_to_send()
        transport = self.transport
        if transport is None:
            return
        if data and not transport.is_closing():
            transport.write(data)
        if self.ended is None and codec.ended is not None:
            self._ended(codec.ended)  # ended by a call (a drain that just finished), not by bytes
        if self.ended is not None:
            transport.close()

    # -- timers: idle connection, request body idle, stream limit ---------------------------------
    def now(self) -> float:
        return self._loop.time()

    def _maybe_idle(self) -> None:
        if not self.streams:
            self._idle_since = now = self._loop.time()
            self._timer.arm(now + KEEPALIVE_S)

    def _check_timers(self) -> None:
        if self.transport is None or self.ended is not None:
            return
        now = self._loop.time()
        slack = 0.001
        limits = self._limits
        next_at = now + KEEPALIVE_S
        if not self.streams:
            due = (self._idle_since if self._idle_since is not None else now) + KEEPALIVE_S
            if now >= due - slack:
                self.close()
                return
            next_at = due
        for stream in list(self.streams.values()):
            exchange = stream.exchange
            if exchange is None:
                continue
            if limits.stream_timeout is not None:
                due = stream.started_at + limits.stream_timeout
                if now >= due - slack:
                    exchange.client_timeout(Rejection.STREAM_TIMEOUT)
                    continue
                next_at = min(next_at, due)
            if not stream.request_ended and not stream.paused:
                due = stream.read_at + limits.body_idle
                if now >= due - slack:
                    exchange.client_timeout(Rejection.REQUEST_BODY_TIMEOUT)
                    continue
                next_at = min(next_at, due)
        if self.transport is not None and self.ended is None:
            self._timer.arm(next_at)

    # -- endings ---------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self.streams

    def drain(self) -> None:
        """Shutdown begins: GOAWAY now; the connection closes when its open streams have ended."""
        for stream in self.streams.values():
            stream.closing = True
        self.codec.goaway()
        self._write_out()

    def close(self) -> None:
        """GOAWAY and close now (idle, or the end of a drain)."""
        self.codec.goaway()
        self._write_out()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self) -> None:
        """Cut the connection now (the end of the drain timeout)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()
