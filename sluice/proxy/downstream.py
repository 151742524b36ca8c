"""`DownstreamConnection`: one client connection, parsed by httptools (llhttp), one request at a time.

The parser runs ahead of the exchange: everything one read brings is parsed at once, and what
belongs to requests not yet served (pipelining) is kept, in order, as parsed messages; they start
one after the other, each when the previous response is complete. What the current request's
read brought reaches its `Exchange` in one call after the parser returns (head, then body so far
and whether it ended), so a request that came in one segment is forwarded in one write.

Reading pauses when the exchange cannot take more (the upstream's socket buffer is full, or it is
still connecting with body piling up), when pipelined requests pile up, and resumes when that
clears. Idle keep-alive connections close after `KEEPALIVE_S`; one timer per connection, re-armed
only when it fires, so requests themselves arm no timer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Protocol, cast

import httptools

from sluice.abi import HeaderMap

from .h1 import dec, response_head
from .stats import ProxyStats

log = logging.getLogger("sluice.server")

KEEPALIVE_S = 75.0
LINGER_S = 10.0
"""After answering a request whose body is still coming, read and drop it this long at most before
closing, so that closing with unread data does not reset the connection under the response."""
PIPELINE_MAX = 16
PIPELINE_BYTES = 256 * 1024

PAUSE_EXCHANGE = 1
PAUSE_PIPELINE = 2
PAUSE_TUNNEL = 4


class RequestHead:
    """A parsed request line and header section, as the client sent it."""

    __slots__ = ("method", "target", "version", "fields", "keep_alive", "has_body", "expect_continue")

    def __init__(
        self,
        method: str,
        target: str,
        version: str,
        fields: list[tuple[str, str]],
        keep_alive: bool,
        has_body: bool,
        expect_continue: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        """"1.1" or "1.0"."""
        self.fields = fields
        """Names lower-case, in order."""
        self.keep_alive = keep_alive
        self.has_body = has_body
        self.expect_continue = expect_continue


class _Message:
    """One parsed request and what of its body has not reached its exchange yet."""

    __slots__ = ("head", "body", "body_size", "trailers", "complete", "delivered")

    def __init__(self) -> None:
        self.head: RequestHead | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        self.trailers: list[tuple[str, str]] | None = None
        self.complete = False
        self.delivered = False  # `complete` reached the exchange


class _HeadTooLarge(Exception):
    pass


def _simple_reply(status: int, text: bytes) -> bytes:
    fields = [("content-type", "text/plain"), ("content-length", str(len(text))), ("connection", "close"),
              ("server", "sluice")]
    return response_head(status, fields) + text


class RequestHandler(Protocol):
    """What a connection drives for the request it is serving (`exchange.Exchange`)."""

    def start(self, body: bytes, complete: bool, trailers: HeaderMap | None) -> None: ...

    def request_body(self, body: bytes, complete: bool, trailers: HeaderMap | None) -> None: ...

    def client_writable(self) -> None: ...

    def client_gone(self) -> None: ...

    def client_error(self, reason: str) -> None: ...


class ClientBytes(Protocol):
    """Where a connection's raw bytes go after an upgrade (`tunnel.Tunnel`)."""

    def client_data(self, data: bytes) -> None: ...

    def client_eof(self) -> None: ...

    def client_writable(self) -> None: ...

    def client_lost(self) -> None: ...


class ConnectionOwner(Protocol):
    """The listener a connection belongs to (`server.ProxyServer`)."""

    stats: ProxyStats
    connections: set[DownstreamConnection]

    def header_limit(self) -> int: ...

    def begin(self, client: DownstreamConnection, head: RequestHead) -> RequestHandler: ...

    def connection_closed(self, client: DownstreamConnection) -> None: ...


class DownstreamConnection(asyncio.Protocol):
    """One client connection of the proxy listener."""

    # Class attributes, so a plain connection pays nothing for them; a TLS listener's
    # connections (listener.TlsDownstreamConnection) set their own.
    scheme = "http"
    tls_properties: dict[str, str | bool] | None = None
    """The `connection.*` properties of a TLS connection (tls.connection.TlsConnectionInfo)."""

    def __init__(self, server: ConnectionOwner) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown:0"
        self.peer_ip = "unknown"
        self.local = "unknown:0"
        self.write_paused = False
        """The client's socket buffer is full: the exchange stops reading its upstream."""
        self.closing = False
        """No further request on this connection (draining, a close asked for, an error)."""
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._limit = server.header_limit()
        self._messages: collections.deque[_Message] = collections.deque()
        self._parsing: _Message | None = None
        self._url: list[bytes] = []
        self._fields: list[tuple[str, str]] = []
        self._head_size = 0
        self._head_raw = 0
        self._content_length = -1
        self._chunked = False
        self._expect = False
        self._exchange: RequestHandler | None = None
        self._dispatching = False
        self._pause = 0
        self._upgraded = False  # the parser stopped at an upgrade request: the rest is raw bytes
        self._broken = False  # the parser failed: the connection ends once what is owed is sent
        self._raw: list[bytes] = []
        self._tunnel: ClientBytes | None = None
        self._lingering = False
        self._idle_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        if peer:
            self.peer_ip = str(peer[0])
            self.peer = f"{peer[0]}:{peer[1]}"
        if sock:
            self.local = f"{sock[0]}:{sock[1]}"
        self.server.connections.add(self)
        self._idle_since = self._loop.time()
        self._timer = self._loop.call_later(KEEPALIVE_S, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server.connection_closed(self)
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            tunnel.client_lost()
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.client_gone()
        self._messages.clear()

    def eof_received(self) -> bool | None:
        if self._tunnel is not None:
            self._tunnel.client_eof()
            return True  # keep writing the upstream's answer
        # Like Envoy (and aiohttp), a client's EOF ends its requests: the connection closes and
        # an exchange in flight is reset as a client disconnect.
        return None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._tunnel is not None:
            self._tunnel.client_writable()
        elif self._exchange is not None:
            self._exchange.client_writable()

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.client_data(data)
            return
        if self._upgraded:
            self._raw.append(data)
            return
        if self._broken:
            return  # after a request that could not be parsed, nothing more is
        self._idle_since = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._upgraded = True
            if offset < len(data):
                self._raw.append(data[offset:])
        except httptools.HttpParserCallbackError as exc:
            self._broken = True
            if isinstance(exc.__context__, _HeadTooLarge):
                self._too_large()
            else:
                log.exception("client %s: request parser callback failed", self.peer, exc_info=exc.__context__)
                self._bad_request(f"{exc.__context__!r}")
            return
        except httptools.HttpParserError as exc:
            self._broken = True
            self._bad_request(str(exc))
            return
        if self._parsing is not None and self._parsing.head is None:
            # A head still incomplete: bound what the parser accumulates for it.
            self._head_raw += len(data)
            if self._head_raw > 2 * self._limit + 16384:
                self._broken = True
                self._too_large()
                return
        self._dispatch()

    # -- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._limit = self.server.header_limit()
        message = _Message()
        self._parsing = message
        self._messages.append(message)
        self._url = []
        self._fields = []
        self._head_size = 20
        self._head_raw = 0
        self._content_length = -1
        self._chunked = False
        self._expect = False

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_size += len(url)
        if self._head_size > self._limit:
            raise _HeadTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        message = self._parsing
        if message is not None and message.head is not None:
            # Trailer fields of a chunked body.
            if message.trailers is None:
                message.trailers = []
            message.trailers.append((dec(name).lower(), dec(value)))
            return
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._limit:
            raise _HeadTooLarge()
        lname = dec(name).lower()
        text = dec(value)
        if lname == "content-length":
            self._content_length = int(text) if text.strip().isdigit() else -1
        elif lname == "transfer-encoding":
            self._chunked = self._chunked or "chunked" in text.lower()
        elif lname == "expect":
            self._expect = text.strip().lower() == "100-continue"
        self._fields.append((lname, text))

    def on_headers_complete(self) -> None:
        message = self._parsing
        assert message is not None
        parser = self._parser
        version = parser.get_http_version()
        target = dec(self._url[0] if len(self._url) == 1 else b"".join(self._url))
        message.head = RequestHead(
            dec(parser.get_method()),
            target,
            version,
            self._fields,
            parser.should_keep_alive(),
            self._chunked or self._content_length > 0,
            self._expect and version == "1.1",
        )
        self._fields = []

    def on_body(self, body: bytes) -> None:
        message = self._parsing
        if message is None or self._lingering and self._messages and message is self._messages[0]:
            return  # the answer went out already; this body is read only to be dropped
        message.body.append(body)
        message.body_size += len(body)

    def on_message_complete(self) -> None:
        message = self._parsing
        if message is not None:
            message.complete = True
        self._parsing = None

    # -- serving requests one at a time ------------------------------------------------------------
    def _dispatch(self) -> None:
        """Start the next request if none runs; hand the current one what arrived for it."""
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while True:
                if self._lingering:
                    if self._messages and self._messages[0].complete:
                        self._close()
                    break
                if not self._messages:
                    break
                message = self._messages[0]
                if message.head is None or message.delivered:
                    break
                exchange = self._exchange
                if exchange is None and self.closing:
                    break
                if exchange is not None and not message.body and not message.complete:
                    break
                body = message.body
                data = body[0] if len(body) == 1 else b"".join(body)
                message.body = []
                message.body_size = 0
                trailers = HeaderMap(message.trailers) if message.trailers else None
                complete = message.delivered = message.complete
                if exchange is None:
                    exchange = self._exchange = self.server.begin(self, message.head)
                    exchange.start(data, complete, trailers)
                else:
                    exchange.request_body(data, complete, trailers)
                if self._exchange is exchange:
                    break
                # Answered at once (no route, a filter's reply, a whole response): the next one.
        finally:
            self._dispatching = False
        self._pipeline_pressure()

    def exchange_done(self, exchange: RequestHandler, keep_alive: bool) -> None:
        """The exchange's response is complete (or it was cut): next request, or close."""
        if self._exchange is not exchange:
            return
        self._exchange = None
        self._pause &= ~PAUSE_EXCHANGE
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        message = self._messages[0] if self._messages else None
        if message is not None and not message.complete:
            # Answered before the request body ended (a local reply, an early upstream answer).
            self._linger()
            return
        if self._messages:
            self._messages.popleft()
        if not keep_alive or self._upgraded or self.closing:
            self._close()
            return
        if not self._messages:
            self._idle_since = self._loop.time()
        self._dispatch()
        self._apply_pause()

    def _linger(self) -> None:
        self._lingering = True
        self.closing = True
        if self._messages:
            self._messages[0].body = []
        self._pause = 0
        self._apply_pause()
        self._loop.call_later(LINGER_S, self._close)

    def _pipeline_pressure(self) -> None:
        waiting = len(self._messages) - 1
        if waiting > 0:
            size = sum(m.body_size for m in self._messages)
            crowded = waiting >= PIPELINE_MAX or size > PIPELINE_BYTES
        else:
            crowded = False
        was = self._pause
        if crowded:
            self._pause |= PAUSE_PIPELINE
        else:
            self._pause &= ~PAUSE_PIPELINE
        if was != self._pause:
            self._apply_pause()

    # -- flow control, asked for by the exchange or the tunnel --------------------------------------
    def pause(self, reason: int = PAUSE_EXCHANGE) -> None:
        if not self._pause & reason:
            self._pause |= reason
            self._apply_pause()

    def unpause(self, reason: int = PAUSE_EXCHANGE) -> None:
        if self._pause & reason:
            self._pause &= ~reason
            self._apply_pause()

    def _apply_pause(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._pause:
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()

    # -- writing -------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def start_tunnel(self, tunnel: ClientBytes) -> None:
        """After a 101: client bytes (those that came after the upgrade request first) go raw."""
        self._tunnel = tunnel
        self._exchange = None
        self._messages.clear()
        raw, self._raw = self._raw, []
        for data in raw:
            tunnel.client_data(data)

    # -- endings -------------------------------------------------------------------------------
    def _check_idle(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        idle = self._idle_since
        now = self._loop.time()
        if idle is not None and self._exchange is None and not self._messages and self._tunnel is None:
            if now - idle >= KEEPALIVE_S - 0.001:
                self._close()
                return
            self._timer = self._loop.call_later(KEEPALIVE_S - (now - idle), self._check_idle)
            return
        self._timer = self._loop.call_later(KEEPALIVE_S, self._check_idle)

    @property
    def idle(self) -> bool:
        return self._exchange is None and not self._messages and self._tunnel is None

    def drain(self) -> None:
        """Shutdown begins: an idle connection closes now, a busy one after its response."""
        self.closing = True
        if self.idle:
            self._close()

    def _too_large(self) -> None:
        stats = self.server.stats
        stats.local_replies["request_headers_too_large"] += 1
        stats.responses["4xx"] += 1
        self._refuse(_simple_reply(431, b"request headers too large\n"))

    def _bad_request(self, reason: str) -> None:
        exchange = self._exchange
        if exchange is not None and self._messages and not self._messages[0].complete:
            # The current request's body is malformed (bad chunk framing): it cannot complete.
            exchange.client_error(reason)
            self._close()
            return
        stats = self.server.stats
        stats.local_replies["bad_request"] += 1
        stats.responses["4xx"] += 1
        log.info("client %s: bad request: %s", self.peer, reason)
        self._refuse(_simple_reply(400, b"bad request\n"))

    def _refuse(self, reply: bytes) -> None:
        """Answer a request that cannot be parsed, after any response still owed, and close."""
        self.closing = True
        if self._exchange is not None:
            # Pipelined garbage behind a request in flight: that one is answered, then we close.
            while len(self._messages) > 1:
                self._messages.pop()
            return
        self.write(reply)
        self._close()

    def close(self) -> None:
        """Close once what was written is sent."""
        self._close()

    def _close(self) -> None:
        self.closing = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self) -> None:
        """Cut the connection now (a reset stream, the end of the drain timeout)."""
        self.closing = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()
