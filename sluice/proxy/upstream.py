"""A lean HTTP/1.1 client connection for upstream traffic: asyncio protocol + httptools parser.

One `UpstreamConnection` carries one exchange at a time (no pipelining) and goes back to its
`ClusterPool` when the response ended cleanly and both sides allow keep-alive. It is driven by
callbacks, not awaited: the exchange hands a `ResponseSink` to `start_request`, and everything
the parser found in one read reaches the sink in one `upstream_response` call (head, body so
far, whether it ended), so a response that came in one segment is forwarded as one write. Flow
control is explicit both ways: `write_body` says when the socket's buffer is full (the caller
stops reading its source until `upstream_writable`), and `pause_reading` stops the response while
the client is slow.

After a `101 Switching Protocols` the connection becomes a byte tunnel (`attach_tunnel`).

Why not aiohttp's client: see bench/README.md (it was measured; this one is faster per request
because it does no URL handling, cookie jar, tracing or multidict header copies).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol, cast

import httptools

from sluice.abi import HeaderMap

from .config import format_host_port
from .deadline import ConnectionTimer
from .h1 import FIELD_NAMES, chunk, decode_fields, field_name, last_chunk, request_head
from .http import HOP_BY_HOP, UpstreamRequest, connection_tokens, drop_connection_tokens

_NOTED_RESPONSE_FIELDS = HOP_BY_HOP | {"content-length"}
"""Response fields the parser looks into: the framing, and those never forwarded."""


class UpstreamError(Exception):
    """The exchange with the upstream failed."""


class ConnectFailed(UpstreamError):
    """No connection could be made (nothing was sent): 502."""


class UpstreamTimeout(UpstreamError):
    """No response headers within the cluster's timeout after the request ended (504), or the
    upstream went quiet for its idle timeout while streaming (504, or a reset once answered)."""


class UpstreamReset(UpstreamError):
    """The connection broke or the response was malformed."""

    def __init__(self, message: str, *, before_response: bool = False) -> None:
        super().__init__(message)
        self.before_response = before_response
        """Nothing of a response was received: a request without body may be retried."""


def timeout_due(
    endpoint: str,
    now: float,
    deadline: float | None,
    timeout: float,
    idle_timeout: float | None,
    io_at: float,
    idle_applies: bool,
) -> float | UpstreamTimeout | None:
    """What an exchange's timer finds when it fires: the time to fire again (a deadline not due
    yet), the timeout to fail with, or None (nothing is due). `deadline`: by when the response
    head must come (None: not waiting for one); `io_at`: the last sign of life, which counts
    while `idle_applies`."""
    if deadline is not None:
        if deadline - now > 0.001:
            return deadline
        return UpstreamTimeout(f"no response from {endpoint} within {timeout:g}s")
    if idle_timeout is not None and idle_applies:
        due = io_at + idle_timeout
        if due - now > 0.001:
            return due
        return UpstreamTimeout(f"upstream {endpoint} idle for {idle_timeout:g}s")
    return None


class _SkipBody(Exception):
    """Raised out of the parser for a response to HEAD: its Content-Length describes no body."""


class ResponseHead:
    __slots__ = ("status", "headers", "keep_alive", "upgrade")

    def __init__(self, status: int, headers: HeaderMap, keep_alive: bool, upgrade: bool) -> None:
        self.status = status
        self.headers = headers
        """`:status` first, then the fields as received (names lower-case), without hop-by-hop
        fields (RFC 9110 7.6.1: those of `HOP_BY_HOP` and those `Connection` names)."""
        self.keep_alive = keep_alive
        self.upgrade = upgrade


class ResponseSink(Protocol):
    """Who receives one exchange's response (the proxy's `Exchange`, or a callout)."""

    def upstream_response(self, head: ResponseHead | None, body: bytes, complete: bool) -> None:
        """What one read brought: the head the first time (else None), body bytes, and whether
        the response ended (its trailers are then in `response_trailers`)."""

    def upstream_failed(self, exc: UpstreamError) -> None:
        """The exchange cannot complete: timeout before the head, reset, malformed response."""

    def upstream_writable(self) -> None:
        """The socket's write buffer drained after `write_body` said it was full."""


class TunnelSink(Protocol):
    """Who receives the upstream's bytes after a 101 (the WebSocket tunnel)."""

    def tunnel_data(self, data: bytes) -> None: ...

    def tunnel_eof(self) -> None: ...

    def upstream_writable(self) -> None: ...


class UpstreamLease(Protocol):
    """What an exchange drives for one request: an `UpstreamConnection` (HTTP/1.1, one exchange
    at a time) or an `http2.upstream.H2UpstreamStream` (one stream of a multiplexed connection).
    `ClusterPool.acquire` hands one out, `ClusterPool.release` takes it back."""

    @property
    def endpoint(self) -> str: ...

    @property
    def requests(self) -> int:
        """Exchanges its connection had carried when this one started (more than 1: reused)."""
        ...

    @property
    def tls_version(self) -> str: ...

    @property
    def write_paused(self) -> bool: ...

    @property
    def response_trailers(self) -> HeaderMap | None: ...

    @property
    def reusable(self) -> bool: ...

    def start_request(
        self,
        request: UpstreamRequest,
        sink: ResponseSink,
        timeout: float | None,
        body: bytes = b"",
        end: bool = False,
        *,
        idle_timeout: float | None = None,
    ) -> bool: ...

    def write_body(self, data: bytes, end: bool) -> bool: ...

    def end_request(self, trailers: HeaderMap | None = None) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def detach(self) -> None: ...

    def close(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to one endpoint."""

    tls_version = ""
    """`TLSv1.3` on a TLS connection (set once connected); a class attribute so plain ones pay nothing."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.requests = 0
        """Exchanges started on this connection (more than 1 = it was reused)."""
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self.write_paused = False
        """The socket's write buffer is above its high-water mark."""
        self._read_paused = False
        self._parser = httptools.HttpResponseParser(self)
        self._sink: ResponseSink | None = None
        self._tunnel: TunnelSink | None = None
        self._tunnel_mode = False
        self._tunnel_rest: list[bytes] = []
        self._timer = ConnectionTimer(self._loop, self._expire)
        self._timeout = 0.0
        self._deadline: float | None = None
        """loop.time() by which the response head must have come (None: not waiting for one)."""
        self._idle_timeout: float | None = None
        self._io_at = 0.0
        """loop.time() of the last sign of life while the idle timeout applies."""
        # Response state for the current exchange.
        self._head_method = False
        self._fields: list[tuple[bytes, bytes]] = []
        """Fields as parsed, raw: the head's until it is complete, then the trailers'."""
        self._trailer_fields: list[tuple[str, str]] = []
        self._head: ResponseHead | None = None
        self._head_new = False
        self._body: list[bytes] = []
        self._message_done = False
        self._done_delivered = False
        self._failed = False
        self._got_bytes = False
        self._close_delimited = False
        # Request state.
        self._chunked = False
        self._remaining: int | None = None
        self._request_done = False

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timer()
        if self._tunnel_mode:
            if self._tunnel is not None:
                tunnel, self._tunnel = self._tunnel, None
                tunnel.tunnel_eof()
            return
        self._peer_gone()

    def eof_received(self) -> bool | None:
        if self._tunnel_mode:
            # Half-close: the client may still send; `tunnel_eof` passes the EOF on.
            if self._tunnel is not None:
                self._tunnel.tunnel_eof()
            return True
        # Closing is the right answer: we never half-close towards an HTTP/1.1 upstream.
        self._peer_gone()
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._idle_timeout is not None and self._sink is not None:
            # The upstream stopped taking the request body: from now on it must show progress.
            self._io_at = now = self._loop.time()
            self._arm(now + self._idle_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        target = self._tunnel if self._tunnel_mode else self._sink
        if target is not None:
            target.upstream_writable()

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._idle_timeout is not None:
            self._io_at = self._loop.time()
        if self._tunnel_mode:
            if self._tunnel is not None:
                self._tunnel.tunnel_data(data)
            else:
                self._tunnel_rest.append(data)
            return
        if self._sink is None:
            # Nobody asked: bytes on an idle keep-alive connection. It cannot be reused safely.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._tunnel_mode = True
            if offset < len(data):
                self._tunnel_rest.append(data[offset:])
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _SkipBody):
                self._message_done = True
                # The parser stopped mid-buffer: the next exchange starts with a fresh one.
                self._parser = httptools.HttpResponseParser(self)
            else:
                self._fail(UpstreamReset(f"response from {self.endpoint} failed: {exc.__context__!r}"))
                return
        except httptools.HttpParserError as exc:
            self._fail(UpstreamReset(f"malformed response from {self.endpoint}: {exc}"))
            return
        self._deliver()

    # -- httptools callbacks -------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        # Kept raw, decoded in one pass once the head (or the trailers) is complete: this runs
        # for every field of every response.
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        raw, self._fields = self._fields, []
        if 100 <= status < 200 and status != 101:
            return  # an interim response (100 Continue, 103 Early Hints): the real one follows
        self._deadline = None
        if self._idle_timeout is not None:
            self._arm(self._io_at + self._idle_timeout)
        fields: list[tuple[str, str]] = [(":status", str(status))]
        connection: list[str] = []
        framed = False  # Content-Length or Transfer-Encoding seen
        known = FIELD_NAMES
        for name_raw, value_raw in raw:
            name = known.get(name_raw) or field_name(name_raw)
            value = value_raw.decode("utf-8", "surrogateescape")
            if name in _NOTED_RESPONSE_FIELDS:
                if name == "content-length":
                    framed = True
                else:
                    # Hop-by-hop: dropped here (one pass, no copy afterwards); what the framing
                    # needs of them is noted on the way.
                    if name == "transfer-encoding":
                        framed = True
                    elif name == "connection":
                        connection.append(value)
                    continue
            fields.append((name, value))
        if connection:
            fields = drop_connection_tokens(fields, connection_tokens(connection))
        headers = HeaderMap.of_lowercase(fields)
        self._close_delimited = not (status in (204, 304) or self._head_method or framed)
        self._head = ResponseHead(status, headers, self._parser.should_keep_alive(), status == 101)
        self._head_new = True
        if self._head_method:
            raise _SkipBody()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._head is None:
            return  # end of an interim response
        if self._fields:  # trailer fields of a chunked body
            raw, self._fields = self._fields, []
            self._trailer_fields = decode_fields(raw)
        self._message_done = True

    # -- delivery --------------------------------------------------------------------------------
    def _deliver(self) -> None:
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
        done = self._message_done and not self._done_delivered
        if head is None and not data and not done:
            return
        if done:
            self._done_delivered = True
        sink.upstream_response(head, data, done)

    def _peer_gone(self) -> None:
        if self._head is not None and not self._message_done and self._close_delimited:
            # A response without Content-Length or chunking ends when the connection does.
            self._message_done = True
            self._head.keep_alive = False
            self._deliver()
            return
        if self._sink is None or self._done_delivered:
            self._closed = True
            return
        if self._head is None:
            self._fail(
                UpstreamReset(
                    f"upstream {self.endpoint} closed the connection before responding",
                    before_response=not self._got_bytes,
                )
            )
        else:
            self._fail(UpstreamReset(f"upstream {self.endpoint} closed the connection mid-response"))

    def _fail(self, exc: UpstreamError) -> None:
        self._cancel_timer()
        if self._failed:
            return
        self._failed = True
        sink = self._sink
        self.close()
        if sink is not None and not self._done_delivered:
            sink.upstream_failed(exc)

    def _arm(self, at: float) -> None:
        if not self._closed:
            self._timer.arm(at)

    def _idle_applies(self) -> bool:
        """The exchange waits on the upstream: its response streams (and is read), or it does not
        take the request body."""
        if self._sink is None or self._tunnel_mode:
            return False
        streaming = self._head is not None and not self._message_done and not self._read_paused
        return streaming or (self.write_paused and not self._request_done)

    def _expire(self) -> None:
        # One timer per connection, not per request: it stays armed across the requests of a
        # kept-alive connection and, when it fires, checks the deadlines of the current one.
        if self._failed or self._closed:
            return
        due = timeout_due(
            self.endpoint, self._loop.time(), self._deadline, self._timeout, self._idle_timeout, self._io_at,
            self._idle_applies(),
        )
        if isinstance(due, UpstreamTimeout):
            self._fail(due)
        elif due is not None:
            self._arm(due)

    def _cancel_timer(self) -> None:
        self._timer.cancel()

    @property
    def response_trailers(self) -> HeaderMap | None:
        return HeaderMap(self._trailer_fields) if self._trailer_fields else None

    def pause_reading(self) -> None:
        """Stop reading the response (the client is not keeping up)."""
        if not self._read_paused and self.transport is not None and not self._closed:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self._closed:
            self._read_paused = False
            self.transport.resume_reading()
            if self._idle_timeout is not None:
                self._io_at = now = self._loop.time()  # the pause was ours, not the upstream's
                self._arm(now + self._idle_timeout)

    # -- request side --------------------------------------------------------------------------
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
        """Send the request head (and `body`, in the same write); the response goes to `sink`.

        Body framing: the request's content_length if known, else chunked if it has a body.
        `timeout`: seconds from the end of the request (its body sent) until the response head,
        else `sink.upstream_failed(UpstreamTimeout)`. `idle_timeout`: seconds the upstream may go
        quiet while its response streams or while it takes no request body (same failure).
        Returns True when the socket's buffer is full (see `write_body`).
        """
        transport = self.transport
        if transport is None or self._closed:
            raise UpstreamReset(f"upstream {self.endpoint} connection is closed", before_response=True)
        self.requests += 1
        self._sink = sink
        has_body = request.has_body
        content_length = request.content_length
        self._head_method = request.method == "HEAD"
        self._chunked = has_body and content_length is None
        self._remaining = content_length if has_body else None
        fields = request.fields
        if self._chunked:
            fields = [*fields, ("transfer-encoding", "chunked")]
        elif has_body and content_length is not None:
            fields = [*fields, ("content-length", str(content_length))]
        self._request_done = not has_body
        self._idle_timeout = idle_timeout
        self._timeout = timeout if timeout is not None else 0.0
        self._deadline = None
        if timeout is not None and not has_body:
            self._start_response_clock()
        head = request_head(request.method, request.target, fields)
        if body or end:
            return self.write_body(body, end, head)
        transport.write(head)
        return self.write_paused

    def write_body(self, data: bytes, end: bool, head: bytes = b"") -> bool:
        """Send request body (framed as the head said). Returns True when the socket's buffer
        is full: the caller stops reading its source until `upstream_writable`."""
        transport = self.transport
        if transport is None or self._closed:
            raise UpstreamReset(f"upstream {self.endpoint} connection lost while sending the body")
        out = head
        if data and not self._request_done:
            if self._chunked:
                out += chunk(data)
            else:
                if self._remaining is not None:
                    if len(data) > self._remaining:
                        raise UpstreamReset("request body longer than its content-length")
                    self._remaining -= len(data)
                out = out + data if out else data
        if end and not self._request_done:
            self._request_done = True
            self._start_response_clock()
            if self._chunked:
                out += last_chunk(None)
            elif self._remaining:
                # The client sent less than it announced; the upstream would wait forever.
                if out:
                    transport.write(out)
                self.close()
                return False
        if out:
            transport.write(out)
        return self.write_paused

    def end_request(self, trailers: HeaderMap | None = None) -> None:
        if self._request_done or self.transport is None or self._closed:
            return
        self._request_done = True
        self._start_response_clock()
        if self._chunked:
            self.transport.write(last_chunk(trailers))
        elif self._remaining:
            self.close()

    def _start_response_clock(self) -> None:
        """The request has been sent in full: the response head is due within the timeout."""
        if self._timeout and self._head is None and self._sink is not None:
            self._deadline = at = self._loop.time() + self._timeout
            self._arm(at)

    # -- tunnel (after 101) --------------------------------------------------------------------
    def attach_tunnel(self, tunnel: TunnelSink) -> None:
        """From now on upstream bytes go to `tunnel` (what came with the 101 first)."""
        self._tunnel_mode = True
        self._tunnel = tunnel
        self._sink = None
        rest, self._tunnel_rest = self._tunnel_rest, []
        for data in rest:
            tunnel.tunnel_data(data)
        if self._closed:
            self._tunnel = None
            tunnel.tunnel_eof()

    def write_raw(self, data: bytes) -> bool:
        """Tunnel bytes to the upstream; True when its buffer is full."""
        if self.transport is None or self._closed:
            return False
        self.transport.write(data)
        return self.write_paused

    def write_eof(self) -> None:
        if self.transport is not None and not self._closed and self.transport.can_write_eof():
            self.transport.write_eof()

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed or self.transport is None or self.transport.is_closing()

    @property
    def reusable(self) -> bool:
        head = self._head
        return (
            not self.closed
            and not self._tunnel_mode
            and not self._failed
            and head is not None
            and head.keep_alive
            and self._message_done
            and not self._body
            and self._request_done
        )

    def detach(self) -> None:
        """The exchange is over (its connection goes back to the pool or is closed)."""
        self._sink = None
        self._deadline = None
        self._idle_timeout = None
        if self._read_paused:
            self.resume_reading()

    def reset_for_next(self) -> None:
        self._sink = None
        self._head = None
        self._head_new = False
        self._fields = []
        self._trailer_fields = []
        self._message_done = False
        self._done_delivered = False
        self._failed = False
        self._got_bytes = False
        self._body = []
        self._request_done = False
        self._chunked = False
        self._remaining = None

    def close(self) -> None:
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._closed = True


async def open_connection(
    host: str,
    port: int,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> UpstreamConnection:
    """Connect (and with `ssl_context`, run the TLS handshake, `server_hostname` as SNI and the
    name the certificate must carry) within `timeout`."""
    loop = asyncio.get_running_loop()
    endpoint = format_host_port(host, port)
    try:
        if ssl_context is None:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(endpoint), host, port), timeout
            )
        else:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(endpoint), host, port, ssl=ssl_context,
                    server_hostname=server_hostname, ssl_handshake_timeout=timeout,
                ),
                timeout,
            )
            ssl_obj = transport.get_extra_info("ssl_object")
            protocol.tls_version = (ssl_obj.version() if ssl_obj is not None else None) or "TLS"
    except TimeoutError:
        raise ConnectFailed(f"connect to {endpoint} timed out after {timeout:g}s") from None
    except ssl.SSLError as exc:
        detail = getattr(exc, "verify_message", None) or exc.reason or exc
        raise ConnectFailed(f"TLS handshake with {endpoint} failed: {detail}") from None
    except OSError as exc:
        raise ConnectFailed(f"connect to {endpoint} failed: {exc.strerror or exc}") from None
    return protocol
