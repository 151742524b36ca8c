"""`Exchange`: one request's I/O around its chain (`FilterChain`, or `PassThrough` when no filter sees it).

Everything is a callback: the client connection hands over the request (`start`, then
`request_body`), the upstream connection hands over the response (`upstream_response`,
`upstream_failed`), filters raise events from timers and callouts (`chain.on_actions`). Each
input is fed to the chain, then the actions it produced are performed in order (`_run`): route
and forward upstream, write to the client, abort, reset. No task or future per request; the only
coroutine is the pool's `acquire`, run eagerly (it completes at once when an idle connection
waits in the pool).

Upstream connections are taken only when the request can use them: a body whose Content-Length
is at most `request_body_prebuffer` is read whole before connecting (a slow client holds no
connection while it sends it), and a request whose body is still coming when it connects
needs one of the cluster's upload slots (`ClusterPool`, `max_upload_connections`), so slow
uploaders never hold every connection of a cluster.

Flow control: request body the upstream cannot take yet (its socket buffer is full, or it is
still connecting) pauses reading from the client until it drains; response body the client
cannot take pauses reading from the upstream. A filter that buffers is bounded by the chain's
`max_body_buffer`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol

from sluice.abi import HeaderMap, LocalReply, StreamInfo

from . import eager, rejections
from .chain import (
    AbortUpstream,
    Action,
    Chain,
    FilterChain,
    ForwardRequestData,
    ForwardRequestHeaders,
    ForwardRequestTrailers,
    PassThrough,
    ResetStream,
    SendResponseData,
    SendResponseHeaders,
    SendResponseTrailers,
)
from .clusters import ClusterPool, PoolExhausted
from .downstream import PAUSE_EXCHANGE, RequestHandler, RequestHead
from .h1 import HttpDate, response_has_body
from .http import (
    VIA,
    RequestIds,
    UpstreamRequest,
    append_value,
    downstream_request_headers,
    origin_form,
    upstream_request,
)
from .rejections import Rejection
from .stats import ProxyStats, status_class
from .upstream import (
    ConnectFailed,
    ResponseHead,
    TunnelSink,
    UpstreamConnection,
    UpstreamError,
    UpstreamLease,
    UpstreamReset,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from .generation import Generation


class ExchangeClient(Protocol):
    """The client side of one exchange: what the exchange reads of its connection, and how its
    response reaches the client.

    `downstream.DownstreamConnection` is the HTTP/1.1 one (one exchange at a time; it frames the
    response: Content-Length or chunked, `Connection`, the HTTP/1.0 rules); `downstream_h2.
    H2StreamClient` is one stream of an HTTP/2 connection. The exchange decides what is sent
    (status, fields, body, when it ends); the client side decides how it is framed.
    """

    peer: str
    """`ip:port` of the client."""
    peer_ip: str
    local: str
    """`ip:port` the client connected to."""
    scheme: str
    tls_properties: dict[str, str | bool] | None
    """The `connection.*` properties of a TLS connection, None on a plain one."""
    closing: bool
    """No further request on this connection after this one (drain, close asked for, error)."""

    def send_continue(self) -> None:
        """`100 Continue`: the request's body is wanted now."""

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
        """Send the response head; `whole`: the response ends here, `sized`: with `body` as all of
        its body (its length is the framing; a response to HEAD says the length, sends none).
        `keep_alive`: the exchange would keep the connection, `request_done`: the request body
        was all read, `length_may_change`: a filter may change the length of the body that
        streams, so its Content-Length goes. Returns whether the connection stays open after it."""
        ...

    def send_response_data(self, data: bytes, end: bool, trailers: HeaderMap | None) -> bool:
        """Send response body (`end`: the last, with `trailers` if any). Returns True while the
        client cannot take more: the exchange stops reading its upstream until `client_writable`."""
        ...

    def start_tunnel(
        self, headers: HeaderMap, upstream: UpstreamConnection, on_closed: Callable[[], None]
    ) -> TunnelSink | None:
        """Answer 101 with `headers` and join the connection to `upstream` byte for byte (the
        tunnel ends with `on_closed`); None where the protocol has no such thing (HTTP/2)."""
        ...

    def pause(self, reason: int = PAUSE_EXCHANGE) -> None:
        """Stop reading the request body (the upstream cannot take more)."""

    def unpause(self, reason: int = PAUSE_EXCHANGE) -> None: ...

    def abort(self) -> None:
        """The response cannot complete: HTTP/1.1 cuts the connection, HTTP/2 resets the stream."""

    def exchange_done(self, exchange: RequestHandler, keep_alive: bool) -> None:
        """The response is complete (or it was cut); `keep_alive`: the connection may serve more."""


class ExchangeOwner(Protocol):
    """The listener an exchange reports to (`server.ProxyServer`)."""

    stats: ProxyStats
    request_ids: RequestIds | None
    date: HttpDate

    @property
    def tracks_headers(self) -> bool:
        """Whether the access log wants the filters that changed headers (costs per request)."""
        ...

    def ended(self, exchange: Exchange) -> None: ...

log = logging.getLogger("sluice.server")

PENDING_BODY_HIGH = 256 * 1024
"""Request body held while the upstream connects, beyond which the client is not read."""

_PROXY_REASONS = frozenset(
    {"no_route", "no_cluster", "upstream_connect_failure", "upstream_overflow", "upstream_timeout", "upstream_reset",
     "server_options", *(r.value for r in Rejection)}
)

ALLOW = "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"
"""`Allow` of the answer to `OPTIONS *` (the proxy's own; what a route allows is the upstream's)."""


class Exchange:
    """One request through the chain and, unless a filter or the router answers, the upstream."""

    __slots__ = (
        "server", "gen", "stats", "client", "head", "info", "chain", "pool", "conn", "_request", "_upgrade",
        "_start", "_busy", "_done", "_reset_reason", "_connecting", "_pending", "_pending_size", "_retried",
        "_got_head", "_upstream_full", "_status", "_body_allowed", "_keep_alive",
        "_response_done", "_request_done", "_tunnel", "_awaiting_body", "_sent_end", "_uploading",
    )

    def __init__(self, server: ExchangeOwner, client: ExchangeClient, head: RequestHead, gen: Generation) -> None:
        self.server = server
        self.gen = gen
        self.stats = server.stats
        self.client = client
        self.head = head
        self.info = StreamInfo()
        self.chain: Chain | None = None
        self.pool: ClusterPool | None = None
        self.conn: UpstreamLease | None = None
        self._request: UpstreamRequest | None = None
        self._upgrade: str | None = None
        self._start = time.monotonic_ns()
        self._busy = False
        self._done = False
        self._reset_reason: str | None = None
        self._connecting: asyncio.Task[UpstreamLease] | None = None
        self._pending: list[tuple[bytes, bool, HeaderMap | None]] = []
        self._pending_size = 0
        self._retried = False
        self._got_head = False
        self._upstream_full = False
        self._status = 0
        self._body_allowed = True
        self._keep_alive = head.keep_alive
        self._response_done = False
        self._request_done = False
        self._tunnel: TunnelSink | None = None
        self._awaiting_body = False  # routed; the upstream is taken once enough body came
        self._sent_end = False  # the end of the request went to the chain's upstream side
        self._uploading = False  # holding one of the pool's upload slots

    @property
    def started_ns(self) -> int:
        """time.monotonic_ns() when the exchange began."""
        return self._start

    # -- input: the client ---------------------------------------------------------------------
    def start(self, body: bytes, complete: bool, trailers: HeaderMap | None) -> None:
        """The request head arrived (with `body` so far; `complete`: the request ended)."""
        head = self.head
        client = self.client
        info = self.info
        info.source_address = client.peer
        info.destination_address = client.local
        info.protocol = f"HTTP/{head.version}"
        scheme = client.scheme
        if client.tls_properties is not None:
            info.scheme = scheme
            info.connection_properties = client.tls_properties
        path, authority = origin_form(head.target)
        headers, upgrade = downstream_request_headers(
            head.method, path, head.fields, client.peer_ip, scheme, self.server.request_ids, authority
        )
        # Only an upgrade the connection held for it may become a tunnel (one with a body never does).
        self._upgrade = upgrade.partition(",")[0].strip().lower() if upgrade is not None and head.upgrade else None
        info.request_headers = headers
        gen = self.gen
        entries = gen.chain_for(path)
        chain: Chain
        if entries:
            chain = FilterChain(
                entries, info, max_body_buffer=gen.config.max_body_buffer, track_headers=self.server.tracks_headers
            )
        else:
            chain = PassThrough()
        self.chain = chain
        chain.on_actions = self._run
        has_body = head.has_body
        if head.expect_continue and has_body and not body and not complete:
            # The filters and the upstream see the body as it streams: nothing to wait for.
            client.send_continue()
        self._busy = True
        try:
            chain.request_headers(headers, not has_body)
            if has_body:
                self._feed_request_body(chain, body, complete, trailers)
            elif complete:
                self._request_done = True
        finally:
            self._busy = False
        self._run()

    def request_body(self, body: bytes, complete: bool, trailers: HeaderMap | None) -> None:
        chain = self.chain
        if self._done or chain is None:
            return
        self._busy = True
        try:
            self._feed_request_body(chain, body, complete, trailers)
        finally:
            self._busy = False
        self._run()

    def _feed_request_body(self, chain: Chain, body: bytes, complete: bool, trailers: HeaderMap | None) -> None:
        if body:
            self.info.request_size += len(body)
            self.stats.bytes_received += len(body)
        if complete:
            self._request_done = True
        if trailers is not None:
            if body:
                chain.request_data(body, False)
            chain.request_trailers(trailers)
        elif body or complete:
            chain.request_data(body, complete)

    def client_writable(self) -> None:
        if self.conn is not None and not self._done:
            self.conn.resume_reading()

    def client_gone(self) -> None:
        """The client connection closed before the exchange ended."""
        if self._done:
            return
        self._reset_reason = "client disconnected"
        self.stats.resets["client_disconnect"] += 1
        if self.chain is not None:
            self.chain.reset("client disconnected")
        self._finish(keep_alive=False)

    def client_error(self, reason: str) -> None:
        """The request body was malformed (chunk framing): 400 (a reset once the response has
        started), and the upstream connection goes at once (it holds half a request)."""
        if self._done:
            return
        self.stats.resets["client_body_error"] += 1
        self._refuse(Rejection.BAD_REQUEST_BODY, reason)

    def client_timeout(self, rejection: Rejection) -> None:
        """The client took too long (its body stalled, or the stream limit passed): 408."""
        if not self._done:
            self._refuse(rejection, "")

    def _refuse(self, rejection: Rejection, detail: str) -> None:
        rejections.count(self.stats, rejection, self.client.peer, detail)
        self._drop_upstream()
        chain = self.chain
        if chain is None or chain.response_started or self._status:
            self._fail(rejection.value, rejection.value)
            return
        self._keep_alive = False
        chain.send_local_reply(LocalReply(rejection.status, rejection.body, details=rejection.value))
        self._run()

    # -- input: the upstream (upstream.ResponseSink) --------------------------------------------
    def upstream_response(self, head: ResponseHead | None, body: bytes, complete: bool) -> None:
        chain = self.chain
        conn = self.conn
        if self._done or chain is None or conn is None:
            return
        trailers = conn.response_trailers if complete else None
        self._busy = True
        try:
            if head is not None:
                if head.upgrade and self._upgrade is None:
                    # A 101 nobody asked for: the upstream speaks something else now.
                    self._busy = False
                    self.upstream_failed(UpstreamReset(f"upstream {conn.endpoint} switched protocols unasked"))
                    return
                self._got_head = True
                info = self.info
                info.response_code = head.status
                info.backend_latency_ns = time.monotonic_ns() - self._start
                headers = head.headers
                if head.upgrade and self._upgrade is not None:
                    headers.add("connection", "upgrade")
                    headers.add("upgrade", self._upgrade)
                append_value(headers, "via", VIA)
                info.response_headers = headers
                eos = head.upgrade or (complete and not body and trailers is None)
                chain.response_headers(headers, eos)
                if eos:
                    return
            if trailers is not None:
                self.info.response_trailers = trailers
                if body:
                    chain.response_data(body, False)
                chain.response_trailers(trailers)
            else:
                chain.response_data(body, complete)
        finally:
            self._busy = False
            self._run()
            if complete and self.conn is conn and self._tunnel is None:
                self._release_upstream()

    def upstream_failed(self, exc: UpstreamError) -> None:
        if self._done or self.chain is None:
            return
        pool = self.pool
        conn = self.conn
        name = pool.name if pool is not None else "?"
        if isinstance(exc, UpstreamTimeout):
            log.info("cluster %s: %s", name, exc)
            self._drop_upstream()
            if self.chain.response_started:
                self._fail(f"upstream timeout: {exc}", "upstream_idle_timeout")
            else:
                self._local("upstream_timeout", 504, b"upstream request timeout\n")
        elif not self._got_head:
            request = self._request
            stale = isinstance(exc, UpstreamReset) and exc.before_response and conn is not None and conn.requests > 1
            self._drop_upstream()
            if stale and request is not None and request.retryable and not self._retried:
                # A kept-alive connection the upstream had closed meanwhile: nothing was
                # processed, so the request goes again on a new connection.
                self._retried = True
                self.stats.upstream_retries += 1
                self._acquire(fresh=True)
                return
            log.info("cluster %s: %s", name, exc)
            self._local("upstream_reset", 502, b"upstream connection closed before responding\n")
        else:
            log.info("cluster %s: response body: %s", name, exc)
            self._drop_upstream()
            if self.chain.response_started:
                self._fail(f"upstream reset: {exc}", "upstream_reset")
            else:
                self._local("upstream_reset", 502, b"upstream connection closed\n")

    def upstream_writable(self) -> None:
        self._upstream_full = False
        if self._pending_size <= PENDING_BODY_HIGH:
            self.client.unpause(PAUSE_EXCHANGE)

    # -- performing the chain's actions ------------------------------------------------------------
    def _run(self) -> None:
        if self._busy or self._done:
            return
        chain = self.chain
        if chain is None:
            return
        self._busy = True
        try:
            while not self._done:
                actions = chain.take_actions()
                if not actions:
                    break
                self._perform(actions)
        except Exception:
            # A bug here must end the request, not leave it hanging.
            log.exception("request %s: internal error", self.head.target)
            self._busy = False
            self._fail("internal error", "internal_error")
        finally:
            self._busy = False

    def _perform(self, actions: list[Action]) -> None:
        i = 0
        n = len(actions)
        while i < n and not self._done:
            action = actions[i]
            kind = type(action)
            if kind is SendResponseHeaders:
                assert isinstance(action, SendResponseHeaders)
                nxt = actions[i + 1] if i + 1 < n else None
                if not action.end_of_stream and type(nxt) is SendResponseData and nxt.end_of_stream:
                    # The whole response is here: one write, Content-Length framing.
                    self._respond(action.headers, nxt.data, whole=True, sized=True)
                    i += 2
                    continue
                self._respond(action.headers, b"", whole=action.end_of_stream, sized=False)
            elif kind is SendResponseData:
                assert isinstance(action, SendResponseData)
                self._send_data(action.data, action.end_of_stream, None)
            elif kind is ForwardRequestHeaders:
                assert isinstance(action, ForwardRequestHeaders)
                nxt = actions[i + 1] if i + 1 < n else None
                if not action.end_of_stream and type(nxt) is ForwardRequestData:
                    # Head and body so far in one write upstream.
                    self._forward_headers(action.headers, False, nxt.data, nxt.end_of_stream)
                    i += 2
                    continue
                self._forward_headers(action.headers, action.end_of_stream, b"", False)
            elif kind is ForwardRequestData:
                assert isinstance(action, ForwardRequestData)
                self._forward_body(action.data, action.end_of_stream, None)
            elif kind is ForwardRequestTrailers:
                assert isinstance(action, ForwardRequestTrailers)
                self._forward_body(b"", True, action.trailers)
            elif kind is SendResponseTrailers:
                assert isinstance(action, SendResponseTrailers)
                self._send_data(b"", True, action.trailers)
            elif kind is AbortUpstream:
                assert isinstance(action, AbortUpstream)
                self._abort_upstream(action.reply)
            elif kind is ResetStream:
                assert isinstance(action, ResetStream)
                self.stats.resets["filter"] += 1
                self._cut(action.reason)
            i += 1

    # -- request side ----------------------------------------------------------------------------
    def _forward_headers(self, headers: HeaderMap, eos: bool, body: bytes, body_end: bool) -> None:
        method = headers.get(":method") or "GET"
        target = headers.get(":path") or "/"
        if target == "*" and method == "OPTIONS":
            # The server's own options (RFC 9110 9.3.7), answered after the filters saw it.
            self.stats.local_replies["server_options"] += 1
            assert self.chain is not None
            self.chain.send_local_reply(LocalReply(200, b"", headers=(("allow", ALLOW),), details="server_options"))
            return
        route = self.gen.router.match(method, target, headers)
        if route is None:
            self._local("no_route", 404, b"no route\n")
            return
        pool = self.gen.clusters.get(route.cluster)
        if pool is None:
            self._local("no_cluster", 503, b"no such cluster\n")
            return
        self.pool = pool
        info = self.info
        info.route_name = route.name or ""
        info.cluster_name = route.cluster
        if self._upgrade is not None and self._upgrade not in route.upgrades:
            self._upgrade = None  # not for this route: proxied as a plain request, never tunnelled
        self._request = upstream_request(
            headers, host_rewrite=pool.host_rewrite, upgrade=self._upgrade, end_of_stream=eos
        )
        self._sent_end = eos or body_end
        if body or body_end:
            self._pending.append((body, body_end, None))
            self._pending_size += len(body)
        length = self._request.content_length
        if self._sent_end or length is None or length > pool.request_body_prebuffer:
            self._acquire(fresh=False)  # a body that streams: it needs an upload slot
        else:
            self._awaiting_body = True  # a small body: all of it first, then a connection

    def _acquire(self, *, fresh: bool) -> None:
        pool = self.pool
        request = self._request
        assert pool is not None and request is not None
        self._awaiting_body = False
        upload = not self._sent_end
        if not fresh:
            conn = pool.lease_idle(upload=upload)
            if conn is not None:
                self._acquired(upload, conn, None)
                return
        self._connecting = eager.start(
            pool.acquire(retry=request.retryable, fresh=fresh, upload=upload), partial(self._acquired, upload)
        )

    def _acquired(self, upload: bool, conn: UpstreamLease | None, exc: BaseException | None) -> None:
        self._connecting = None
        pool = self.pool
        assert pool is not None
        if exc is None and conn is not None and upload:
            self._uploading = True
        if exc is not None or conn is None:
            if isinstance(exc, asyncio.CancelledError) or self._done:
                return
            if isinstance(exc, PoolExhausted):
                log.info("%s", exc)
                self._local("upstream_overflow", 503, b"upstream overflow\n")
            elif isinstance(exc, ConnectFailed):
                log.info("cluster %s: %s", pool.name, exc)
                self._local("upstream_connect_failure", 502, b"upstream connect error\n")
            else:
                log.error("cluster %s: connect: %r", pool.name, exc)
                self._fail("internal error", "internal_error")
            return
        chain = self.chain
        if self._done or chain is None or chain.halted or chain.local_reply is not None:
            self._end_upload()
            pool.release(conn)
            return
        self.conn = conn
        self.info.upstream_address = conn.endpoint
        if conn.tls_version:
            self.info.upstream_tls_version = conn.tls_version
        self.stats.upstream_requests += 1
        request = self._request
        assert request is not None
        if request.has_body:
            request = self._request = self._framed(request, chain)
        pending, self._pending = self._pending, []
        self._pending_size = 0
        body, end, trailers = pending.pop(0) if pending and pending[0][2] is None else (b"", False, None)
        try:
            full = conn.start_request(request, self, pool.timeout, body, end, idle_timeout=pool.idle_timeout)
            for data, last, tail in pending:
                full = self._write_upstream(conn, data, last, tail)
            if self._sent_end:
                self._end_upload()
        except UpstreamError:
            self._drop_upstream()
            self._local("upstream_reset", 502, b"upstream connection closed\n")
            return
        if full:
            self._upstream_full = True
            self.client.pause(PAUSE_EXCHANGE)
        else:
            self.client.unpause(PAUSE_EXCHANGE)

    def _framed(self, request: UpstreamRequest, chain: Chain) -> UpstreamRequest:
        """The request framed for the body it will actually carry: a body all in hand (read
        whole before connecting, or ended with the head) is framed by its length as the filters
        left it; one that still streams keeps the client's Content-Length only if no filter can
        change its length, else goes chunked."""
        length = -1
        if self._sent_end:
            length = 0
            for data, _end, trailers in self._pending:
                if trailers is not None:
                    length = -1  # trailers need chunked framing
                    break
                length += len(data)
        if length >= 0:
            return request if request.content_length == length else request._replace(content_length=length)
        if request.content_length is not None and chain.may_change_body(request=True):
            return request._replace(content_length=None)
        return request

    def _write_upstream(self, conn: UpstreamLease, data: bytes, end: bool, trailers: HeaderMap | None) -> bool:
        if trailers is not None:
            full = conn.write_body(data, False) if data else conn.write_paused
            conn.end_request(trailers)
            self._end_upload()
            return full
        full = conn.write_body(data, end)
        if end:
            self._end_upload()
        return full

    def _end_upload(self) -> None:
        """The request body is all sent (or will never be): its upload slot is free again."""
        if self._uploading:
            self._uploading = False
            if self.pool is not None:
                self.pool.upload_done()

    def _forward_body(self, data: bytes, end: bool, trailers: HeaderMap | None) -> None:
        conn = self.conn
        if conn is not None:
            try:
                full = self._write_upstream(conn, data, end, trailers)
            except (UpstreamError, ConnectionError) as exc:
                # The upstream may already have answered (e.g. 413 before reading it all); let the
                # response side decide, and stop sending.
                log.debug("upstream %s: request body: %r", conn.endpoint, exc)
                return
            if full and not self._upstream_full:
                self._upstream_full = True
                self.client.pause(PAUSE_EXCHANGE)
        elif self._connecting is not None or self._awaiting_body:
            self._pending.append((data, end, trailers))
            self._pending_size += len(data)
            if end or trailers is not None:
                self._sent_end = True
            if self._awaiting_body and self.pool is not None:
                if self._sent_end or self._pending_size > self.pool.request_body_prebuffer:
                    self._acquire(fresh=False)
            elif self._pending_size > PENDING_BODY_HIGH:
                self.client.pause(PAUSE_EXCHANGE)
        # else: no route or the upstream was dropped: the body has nowhere to go.

    # -- response side ---------------------------------------------------------------------------
    def _respond(self, headers: HeaderMap, body: bytes, *, whole: bool, sized: bool) -> None:
        """Send the response head; `whole`: the response ends here, `sized`: with `body` as all of
        its body (the client side frames it: `ExchangeClient.send_response_head`)."""
        status = int(headers.get(":status") or 502)
        if status == 101 and isinstance(self.conn, UpstreamConnection) and self._upgrade is not None:
            self._start_tunnel(headers)
            return
        allowed = response_has_body(status, self.head.method)
        # A filter that may change a streamed body's length: the client side drops its length.
        length_may_change = (
            not whole and allowed and self.chain is not None and self.chain.may_change_body(request=False)
        )
        self._status = status
        self._body_allowed = allowed
        self._keep_alive = self.client.send_response_head(
            status,
            headers,
            body,
            whole=whole,
            sized=sized,
            body_allowed=allowed,
            keep_alive=self._keep_alive,
            request_done=self._request_done,
            length_may_change=length_may_change,
        )
        if whole:
            self._count_body(len(body))
            self._response_complete()

    def _send_data(self, data: bytes, end: bool, trailers: HeaderMap | None) -> None:
        if self._response_done or self._status == 0:
            return
        if not self._body_allowed:
            data = b""
        elif data:
            self._count_body(len(data))
        full = self.client.send_response_data(data, end, trailers)
        if end:
            self._response_complete()
        elif full and self.conn is not None:
            self.conn.pause_reading()

    def _count_body(self, size: int) -> None:
        self.info.response_size += size
        self.stats.bytes_sent += size

    def _response_complete(self) -> None:
        self._response_done = True
        self.info.response_code = self._status
        self.stats.responses[status_class(self._status)] += 1
        self._finish(keep_alive=self._keep_alive)

    # -- upgrades ------------------------------------------------------------------------------
    def _start_tunnel(self, headers: HeaderMap) -> None:
        conn = self.conn
        assert isinstance(conn, UpstreamConnection)  # only HTTP/1.1 upstreams switch protocols
        tunnel = self.client.start_tunnel(headers, conn, self._tunnel_closed)
        if tunnel is None:
            self._fail("upgrade not possible on this connection", "upstream_reset")
            return
        self._status = 101
        self.info.response_code = 101
        self.stats.websocket_upgrades += 1
        self.stats.responses["1xx"] += 1
        self._tunnel = tunnel
        conn.attach_tunnel(tunnel)

    def _tunnel_closed(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
            if self.pool is not None:
                self.pool.release(conn)
        self._response_done = True
        self._finish(keep_alive=False)

    # -- endings -------------------------------------------------------------------------------
    def _local(self, reason: str, status: int, body: bytes) -> None:
        """A reply from the proxy itself; it still passes the filters' encoding path."""
        self.stats.local_replies[reason] += 1
        assert self.chain is not None
        self.chain.send_local_reply(LocalReply(status, body, details=reason))

    def _abort_upstream(self, reply: LocalReply) -> None:
        # Proxy-made replies were counted by `_local`; count the filters' (and the chain's 413/500).
        if reply.details not in _PROXY_REASONS:
            self.stats.local_replies[reply.details or "filter"] += 1
        self._drop_upstream()

    def _release_upstream(self) -> None:
        self._end_upload()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.detach()
            if self.pool is not None:
                self.pool.release(conn)

    def _drop_upstream(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        self._pending = []
        self._pending_size = 0
        self._awaiting_body = False
        self._end_upload()
        self.client.unpause(PAUSE_EXCHANGE)
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.detach()
            if not conn.reusable:
                conn.close()
            if self.pool is not None:
                self.pool.release(conn)

    def _fail(self, reason: str, kind: str) -> None:
        """Abort the exchange: the response cannot be completed."""
        if self._reset_reason is None and not self._done:
            self.stats.resets[kind] += 1
        self._cut(reason)

    def _cut(self, reason: str) -> None:
        if self._done:
            return
        if self._reset_reason is None:
            self._reset_reason = reason
        if self.chain is not None:
            self.chain.reset(reason)
        self.client.abort()
        self._finish(keep_alive=False)

    def _finish(self, *, keep_alive: bool) -> None:
        if self._done:
            return
        self._done = True
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        if self.conn is not None and self._tunnel is None:
            # Keep-alive only if the upstream exchange completed; release() closes it otherwise.
            self._release_upstream()
        chain = self.chain
        if chain is not None:
            self.info.duration_ns = time.monotonic_ns() - self._start
            chain.complete()
        self.server.ended(self)
        self.client.exchange_done(self, keep_alive and self._reset_reason is None)
