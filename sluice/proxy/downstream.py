"""`DownstreamConnection`: one client connection, parsed by httptools (llhttp), one request at a time.

The parser runs ahead of the exchange: everything one read brings is parsed at once, and what
belongs to requests not yet served (pipelining) is kept, in order, as parsed messages; they start
one after the other, each when the previous response is complete. What the current request's
read brought reaches its `Exchange` in one call after the parser returns (head, then body so far
and whether it ended), so a request that came in one segment is forwarded in one write.

Reading pauses when the exchange cannot take more (the upstream's socket buffer is full, or it is
still connecting with body piling up), when pipelined requests pile up, and resumes when that
clears. Idle keep-alive connections close after `KEEPALIVE_S`.

Timeouts (the listener's `ClientLimits`): a request head must be complete `header_timeout` after
its first byte, and while a request body is being read (not paused by the proxy) no more than
`body_idle` may pass between reads; both are answered 408. One timer per connection, re-armed
only when it fires or when a deadline earlier than its own appears (the first request after an
idle spell): requests that arrive whole arm nothing and read no clock.

Upgrades: a request with `Upgrade` and no body is held (`RequestHead.upgrade`) and the bytes after
it are kept raw until the exchange says whether the route tunnels it. If it does not, or if the
upgrade request has a body (never tunnelled), parsing goes on as plain HTTP: llhttp stops at
every upgrade request, so a fresh parser takes over, given the request's body framing first.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from sluice.abi import HeaderMap

from . import rejections
from .deadline import ConnectionTimer
from .h1 import (
    CONTINUE_100,
    FIELD_NAMES,
    LAST_CHUNK,
    HttpDate,
    chunk,
    decode_fields,
    field_name,
    last_chunk,
    response_head,
)
from .http import copy_response_fields
from .rejections import Rejection
from .stats import ProxyStats
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .upstream import UpstreamConnection

log = logging.getLogger("sluice.server")

KEEPALIVE_S = 75.0
LINGER_S = 10.0
"""After answering a request whose body is still coming, read and drop it this long at most before
closing, so that closing with unread data does not reset the connection under the response."""
PIPELINE_MAX = 16
PIPELINE_BYTES = 256 * 1024

PAUSE_EXCHANGE = 1
PAUSE_PIPELINE = 2


_FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding", "expect"})
"""Request fields the parser looks into (one set lookup for all the others)."""


_FRAMED_HERE = frozenset({"transfer-encoding"})
"""Response fields the HTTP/1.1 connection writes itself, never copied (its framing)."""


def client_addresses(transport: asyncio.BaseTransport) -> tuple[str, str, str]:
    """A client connection's `peer` ("ip:port"), `peer_ip` and `local` ("ip:port") addresses;
    "unknown" where the transport cannot tell (a closed socket)."""
    peer = transport.get_extra_info("peername")
    sock = transport.get_extra_info("sockname")
    return (
        f"{peer[0]}:{peer[1]}" if peer else "unknown:0",
        str(peer[0]) if peer else "unknown",
        f"{sock[0]}:{sock[1]}" if sock else "unknown:0",
    )


class RequestHead:
    """A parsed request line and header section, as the client sent it."""

    __slots__ = ("method", "target", "version", "fields", "keep_alive", "has_body", "expect_continue", "upgrade")

    def __init__(
        self,
        method: str,
        target: str,
        version: str,
        fields: list[tuple[str, str]],
        keep_alive: bool,
        has_body: bool,
        expect_continue: bool,
        upgrade: bool = False,
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
        self.upgrade = upgrade
        """An upgrade request the route may tunnel (it has no body); the bytes after it wait."""


@dataclasses.dataclass(frozen=True, slots=True)
class ClientLimits:
    """What a client connection enforces, from the config current when a request begins."""

    header_size: int = 8192
    header_timeout: float = 10.0
    body_idle: float = 30.0
    stream_timeout: float | None = None


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


class _Refused(Exception):
    """Raised out of a parser callback: the request is refused for `rejection`."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.value)
        self.rejection = rejection


_CODINGS_OK = frozenset({"chunked", "identity", ""})


class RequestHandler(Protocol):
    """What a connection drives for the request it is serving (`exchange.Exchange`)."""

    def start(self, body: bytes, complete: bool, trailers: HeaderMap | None) -> None: ...

    def request_body(self, body: bytes, complete: bool, trailers: HeaderMap | None) -> None: ...

    def client_writable(self) -> None: ...

    def client_gone(self) -> None: ...

    def client_error(self, reason: str) -> None: ...

    def client_timeout(self, rejection: Rejection) -> None: ...


class ClientBytes(Protocol):
    """Where a connection's raw bytes go after an upgrade (`tunnel.Tunnel`)."""

    def client_data(self, data: bytes) -> None: ...

    def client_eof(self) -> None: ...

    def client_writable(self) -> None: ...

    def client_lost(self) -> None: ...


class ServedConnection(Protocol):
    """Any client connection of a listener (HTTP/1.1 here, `downstream_h2.H2ClientConnection`)."""

    @property
    def idle(self) -> bool: ...

    def drain(self) -> None:
        """Shutdown begins: an idle connection closes now, a busy one once its requests end."""

    def abort(self) -> None:
        """Cut the connection now."""


class ConnectionOwner(Protocol):
    """The listener a connection belongs to (`server.ProxyServer`)."""

    stats: ProxyStats
    connections: set[ServedConnection]
    date: HttpDate

    def limits(self) -> ClientLimits: ...

    def begin(self, client: DownstreamConnection, head: RequestHead) -> RequestHandler: ...

    def connection_closed(self, client: ServedConnection) -> None: ...


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
        self._limits = server.limits()
        self._limit = self._limits.header_size
        self._messages: collections.deque[_Message] = collections.deque()
        self._parsing: _Message | None = None
        self._url: list[bytes] = []
        self._raw_fields: list[tuple[bytes, bytes]] = []
        self._fed = 0  # bytes fed since the head being parsed began, at most (bounds its size)
        self._head_size = 0
        self._head_raw = 0
        self._content_length = -1
        self._chunked = False
        self._expect = False
        self._bad_coding = False
        self._resume_body: bytes | None = None  # an upgrade request with a body: its framing
        self._resuming = False  # a fresh parser is reading that framing (not a new request)
        self._exchange: RequestHandler | None = None
        self._chunked_response = False  # the current response's body goes out chunked
        self._dispatching = False
        self._pause = 0
        self._upgraded = False  # the parser stopped at an upgrade request: the rest is raw bytes
        self._broken = False  # the parser failed: the connection ends once what is owed is sent
        self._raw: list[bytes] = []
        self._raw_size = 0
        self._tunnel: ClientBytes | None = None
        self._lingering = False
        self._idle_since: float | None = None
        self._head_since: float | None = None  # loop.time() of the read that began a head in pieces
        self._read_at = 0.0  # loop.time() of the last read while a request body is awaited
        self._exchange_at = 0.0  # loop.time() when the current exchange began (stream limit only)
        self._timer = ConnectionTimer(self._loop, self._check_timers)

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer, self.peer_ip, self.local = client_addresses(transport)
        self.server.connections.add(self)
        self._idle_since = now = self._loop.time()
        self._arm(now + KEEPALIVE_S)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._timer.cancel()
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
            self._hold_raw(data)
            return
        if self._broken:
            return  # after a request that could not be parsed, nothing more is
        self._idle_since = None
        self._fed = self._head_raw + len(data)
        if not self._feed(data):
            return
        parsing = self._parsing
        if parsing is not None:
            if parsing.head is None:
                # A head still incomplete: bound what the parser accumulates for it, and time it.
                self._head_raw += len(data)
                if self._head_raw > self._limit and self._fields_size() > self._limit:
                    self._broken = True
                    self._refuse_now(Rejection.REQUEST_HEADERS_TOO_LARGE)
                    return
                if self._head_raw > 2 * self._limit + 16384:
                    self._broken = True
                    # Nearly all of it the target: the request line is what is too long (414).
                    in_line = self._head_raw - sum(len(u) for u in self._url) < 64
                    self._refuse_now(
                        Rejection.REQUEST_LINE_TOO_LONG if in_line else Rejection.REQUEST_HEADERS_TOO_LARGE
                    )
                    return
                if self._head_since is None:
                    self._head_since = now = self._loop.time()
                    self._arm(now + self._limits.header_timeout)
            elif parsing is self._messages[0]:
                # The current request's body is still coming: the idle clock restarts.
                self._read_at = now = self._loop.time()
                self._arm(now + self._limits.body_idle)
        self._dispatch()

    def _feed(self, data: bytes) -> bool:
        """Parse `data`; False when the connection cannot go on (the parser failed)."""
        while True:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                offset = exc.args[0] if exc.args else len(data)
                rest = data[offset:]
                resume, self._resume_body = self._resume_body, None
                if resume is None:
                    self._upgraded = True
                    if rest:
                        self._hold_raw(rest)
                    return True
                # An upgrade that is never tunnelled (it has a body): parse on, body first.
                self._parser = httptools.HttpRequestParser(self)
                self._resuming = True
                data = resume + rest
                continue
            except httptools.HttpParserCallbackError as exc:
                self._broken = True
                cause = exc.__context__
                if isinstance(cause, _Refused):
                    self._refuse_now(cause.rejection)
                else:
                    # A bug in a callback: the request is refused all the same, the bug logged once.
                    log.error("client %s: request parser callback failed: %r", self.peer, cause)
                    self._bad_request("internal parser error")
                return False
            except httptools.HttpParserError as exc:
                self._broken = True
                self._bad_request(str(exc))
                return False
            return True

    def _hold_raw(self, data: bytes) -> None:
        """Bytes after an upgrade request, kept until its exchange decides (bounded)."""
        self._raw.append(data)
        self._raw_size += len(data)
        if self._raw_size > PIPELINE_BYTES:
            self.pause(PAUSE_PIPELINE)

    # -- httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._resuming:
            return  # the framing of an upgrade request's body, fed to a fresh parser
        self._limits = limits = self.server.limits()
        self._limit = limits.header_size
        message = _Message()
        self._parsing = message
        self._messages.append(message)
        self._url = []
        self._raw_fields = []
        self._head_size = 20
        self._head_raw = 0
        self._content_length = -1
        self._chunked = False
        self._expect = False
        self._bad_coding = False

    def on_url(self, url: bytes) -> None:
        if self._resuming:
            return
        self._url.append(url)
        self._head_size += len(url)
        if self._head_size > self._limit:
            raise _Refused(Rejection.REQUEST_LINE_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Kept raw: decoded, measured and looked into once the head (or the trailers) is
        # complete, in one pass; this runs for every field of every request.
        self._raw_fields.append((name, value))

    def _fields_size(self) -> int:
        """What the head parsed so far counts against `header_size` (line and fields)."""
        return self._head_size + sum([len(n) + len(v) + 4 for n, v in self._raw_fields])

    def _framing(self, name: str, text: str) -> None:
        """Note what one of the request's framing fields says."""
        if name == "content-length":
            # llhttp checked the digits (and refuses overflow); strip() only drops blanks.
            digits = text.strip()
            self._content_length = int(digits) if digits.isascii() and digits.isdigit() else -1
        elif name == "transfer-encoding":
            codings = text.lower()
            self._chunked = self._chunked or "chunked" in codings
            # RFC 9112 6.1: a coding the proxy does not implement is refused (501), never passed on.
            if not self._bad_coding:
                self._bad_coding = any(c.strip() not in _CODINGS_OK for c in codings.split(","))
        else:
            self._expect = text.strip().lower() == "100-continue"

    def on_headers_complete(self) -> None:
        if self._resuming:
            self._resuming = False  # what follows is the upgrade request's body
            self._raw_fields = []  # the framing given to the fresh parser, not the client's fields
            return
        message = self._parsing
        assert message is not None
        self._head_since = None
        # Measured only when it may be over the limit (a head is never larger than what was fed for it).
        if self._fed > self._limit and self._fields_size() > self._limit:
            raise _Refused(Rejection.REQUEST_HEADERS_TOO_LARGE)
        # Decoded in one loop, the framing fields looked into on the way (a set lookup for the others).
        raw, self._raw_fields = self._raw_fields, []
        fields: list[tuple[str, str]] = []
        known = FIELD_NAMES
        for name_raw, value_raw in raw:
            kv = (known.get(name_raw) or field_name(name_raw), value_raw.decode("utf-8", "surrogateescape"))
            if kv[0] in _FRAMING_FIELDS:
                self._framing(*kv)
            fields.append(kv)
        if self._bad_coding:
            raise _Refused(Rejection.UNSUPPORTED_TRANSFER_CODING)
        parser = self._parser
        method = parser.get_method().decode("utf-8", "surrogateescape")
        if method == "CONNECT":
            raise _Refused(Rejection.METHOD_NOT_ALLOWED)  # a reverse proxy opens no tunnels by CONNECT
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            # llhttp reads a request line without a version as HTTP/0.9, and takes "HTTP/2.0".
            raise _Refused(Rejection.HTTP_VERSION_NOT_SUPPORTED)
        url = self._url
        target = (url[0] if len(url) == 1 else b"".join(url)).decode("utf-8", "surrogateescape")
        has_body = self._chunked or self._content_length > 0
        upgrade = parser.should_upgrade()
        if upgrade and has_body:
            # llhttp would hand the body over raw; a fresh parser reads it with this framing.
            framing = b"transfer-encoding: chunked" if self._chunked else b"content-length: %d" % self._content_length
            self._resume_body = b"PUT / HTTP/1.1\r\n" + framing + b"\r\n\r\n"
            upgrade = False
        message.head = RequestHead(
            method,
            target,
            version,
            fields,
            parser.should_keep_alive(),
            has_body,
            self._expect and version == "1.1",
            upgrade,
        )

    def on_body(self, body: bytes) -> None:
        message = self._parsing
        if message is None or self._lingering and self._messages and message is self._messages[0]:
            return  # the answer went out already; this body is read only to be dropped
        message.body.append(body)
        message.body_size += len(body)

    def on_message_complete(self) -> None:
        if self._resume_body is not None:
            return  # llhttp skipped the upgrade request's body; the fresh parser will read it
        message = self._parsing
        if message is not None:
            if self._raw_fields:  # trailer fields of a chunked body
                raw, self._raw_fields = self._raw_fields, []
                message.trailers = decode_fields(raw)
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
                    if self._limits.stream_timeout is not None:
                        self._exchange_at = now = self._loop.time()
                        self._arm(now + self._limits.stream_timeout)
                    if not complete:
                        self._read_at = self._loop.time()
                    exchange.start(data, complete, trailers)
                else:
                    exchange.request_body(data, complete, trailers)
                if self._exchange is exchange:
                    break
                # Answered at once (no route, a filter's reply, a whole response): the next one.
        finally:
            self._dispatching = False
        if len(self._messages) > 1 or self._pause & PAUSE_PIPELINE:
            self._pipeline_pressure()  # requests queue behind the current one, or did

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
        if not keep_alive or self.closing:
            self._close()
            return
        if self._upgraded:
            # Answered without a tunnel: what came after the upgrade request is HTTP again.
            self._upgraded = False
            self._parser = httptools.HttpRequestParser(self)
            raw, self._raw = self._raw, []
            self._raw_size = 0
            self._pause &= ~PAUSE_PIPELINE
            for data in raw:
                self.data_received(data)  # another upgrade request holds the rest raw again
        if self._messages:
            self._dispatch()  # a pipelined request: it starts now
        else:
            self._idle_since = self._loop.time()
            self._pause &= ~PAUSE_PIPELINE  # nothing waits behind a request any more
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
            # The time reading was paused by the proxy does not count against the client.
            self._read_at = self._loop.time()

    # -- writing: the client side of the exchange (exchange.ExchangeClient) -----------------------
    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def send_continue(self) -> None:
        self.write(CONTINUE_100)

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
        """The status line and fields, framed for HTTP/1.1 (or 1.0): Content-Length when the
        length is known, else chunked (1.1) or the end of the connection (1.0); a whole response
        goes out in one write. Returns whether the connection stays open after it."""
        fields: list[tuple[str, str]] = []
        # Content-Length is recomputed from the body actually sent (`sized`), or left out when a
        # filter may change the length of a body that streams; Transfer-Encoding is ours.
        has_length, has_server, has_date = copy_response_fields(
            headers, fields, _FRAMED_HERE, sized or length_may_change
        )
        keep_alive = keep_alive and not self.closing
        current = self._messages[0].head if self._messages else None
        version = current.version if current is not None else "1.1"
        self._chunked_response = False
        if whole:
            if (sized or not has_length) and status not in (204, 304) and not 100 <= status < 200:
                fields.append(("content-length", str(len(body))))
            if not request_done:
                keep_alive = False  # the rest of the request body is not worth reading
        elif body_allowed and not has_length:
            if version == "1.1":
                self._chunked_response = True
                fields.append(("transfer-encoding", "chunked"))
            else:
                keep_alive = False  # HTTP/1.0: the body ends when the connection does
        if not keep_alive:
            fields.append(("connection", "close"))
        elif version == "1.0":
            fields.append(("connection", "keep-alive"))
        if not has_server:
            fields.append(("server", "sluice"))
        if not has_date:
            fields.append(("date", self.server.date.now()))
        out = response_head(status, fields)
        if whole and body and body_allowed:
            out += body
        self.write(out)
        return keep_alive

    def send_response_data(self, data: bytes, end: bool, trailers: HeaderMap | None) -> bool:
        out = b""
        chunked = self._chunked_response
        if data:
            out = chunk(data) if chunked else data
        if end and chunked:
            tail = last_chunk(trailers) if trailers is not None else LAST_CHUNK
            out = out + tail if out else tail
        if out:
            self.write(out)
        return self.write_paused

    def start_tunnel(
        self, headers: HeaderMap, upstream: UpstreamConnection, on_closed: Callable[[], None]
    ) -> Tunnel:
        """Answer 101; from now on client bytes (those that came after the upgrade request first)
        go raw to `upstream` and back."""
        fields = [(k, v) for k, v in headers if k[0] != ":"]
        if "server" not in headers:
            fields.append(("server", "sluice"))
        self.write(response_head(101, fields))
        tunnel = Tunnel(self, upstream, on_closed)
        self._tunnel = tunnel
        self._exchange = None
        self._messages.clear()
        raw, self._raw = self._raw, []
        self._raw_size = 0
        self.unpause(PAUSE_PIPELINE)
        for data in raw:
            tunnel.client_data(data)
        return tunnel

    # -- timers --------------------------------------------------------------------------------
    def _arm(self, deadline: float) -> None:
        self._timer.arm(deadline)

    def _check_timers(self) -> None:
        if self.transport is None or self.transport.is_closing() or self._tunnel is not None:
            return
        now = self._loop.time()
        limits = self._limits
        next_at = now + KEEPALIVE_S
        slack = 0.001
        if self._head_since is not None and not self._broken:
            due = self._head_since + limits.header_timeout
            if now >= due - slack:
                self._head_since = None
                self._broken = True
                self._refuse_now(Rejection.REQUEST_HEADER_TIMEOUT)
                return
            next_at = min(next_at, due)
        exchange = self._exchange
        if exchange is not None:
            if limits.stream_timeout is not None:
                due = self._exchange_at + limits.stream_timeout
                if now >= due - slack:
                    exchange.client_timeout(Rejection.STREAM_TIMEOUT)
                    self._rearm(now)
                    return
                next_at = min(next_at, due)
            message = self._messages[0] if self._messages else None
            waiting = message is not None and message.head is not None and not message.complete
            if waiting and not self._pause and not self._lingering and not self._broken:
                due = self._read_at + limits.body_idle
                if now >= due - slack:
                    exchange.client_timeout(Rejection.REQUEST_BODY_TIMEOUT)
                    self._close()  # once the 408 is out: a stalled client is not worth lingering for
                    return
                next_at = min(next_at, due)
        elif self._idle_since is not None and not self._messages:
            due = self._idle_since + KEEPALIVE_S
            if now >= due - slack:
                self._close()
                return
            next_at = min(next_at, due)
        self._arm(next_at)

    def _rearm(self, now: float) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._arm(now + KEEPALIVE_S)

    # -- endings -------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return self._exchange is None and not self._messages and self._tunnel is None

    def drain(self) -> None:
        """Shutdown begins: an idle connection closes now, a busy one after its response."""
        self.closing = True
        if self.idle:
            self._close()

    def _refuse_now(self, rejection: Rejection, detail: str = "") -> None:
        """Refuse the request being parsed: counted, logged, sluice's own reply, then close."""
        stats = self.server.stats
        rejections.count(stats, rejection, self.peer, detail)
        stats.responses[f"{rejection.status // 100}xx"] += 1
        self._refuse(rejections.reply_bytes(rejection))

    def _bad_request(self, reason: str) -> None:
        exchange = self._exchange
        if exchange is not None and self._messages and not self._messages[0].complete:
            # The current request's body is malformed (bad chunk framing): it cannot complete.
            exchange.client_error(reason)
            self._close()
            return
        self._refuse_now(Rejection.BAD_REQUEST, reason)

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
