"""The downstream side: aiohttp's low-level HTTP/1.1 server, one `Exchange` per request.

An `Exchange` owns one request's `FilterChain` and performs its actions: it routes when the chain
forwards the request headers, talks to the upstream through the cluster's pool, and writes the
response the chain lets through. Three coroutines feed the chain (client body, upstream response,
and filter callbacks arriving from timers or callouts); a single action loop performs the chain's
actions in order, and the feeders wait for that loop to catch up before reading more (that is the
flow control: nothing is read faster than the other side takes it, unless a filter buffers).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from sluice.abi import HeaderMap, LocalReply, StreamInfo

from .chain import (
    AbortUpstream,
    Action,
    FilterChain,
    ForwardRequestData,
    ForwardRequestHeaders,
    ForwardRequestTrailers,
    ResetStream,
    SendResponseData,
    SendResponseHeaders,
    SendResponseTrailers,
)
from .clusters import ClusterPool, PoolExhausted
from .http import (
    IDEMPOTENT_METHODS,
    VIA,
    RequestIds,
    append_value,
    downstream_request_headers,
    path_only,
    strip_hop_by_hop,
)
from .logs import access_line, access_record
from .metrics import TrafficStats
from .upstream import ConnectFailed, UpstreamConnection, UpstreamError, UpstreamReset, UpstreamTimeout

if TYPE_CHECKING:
    from .app import Generation

log = logging.getLogger("sluice.server")
access_log = logging.getLogger("sluice.access")

BODYLESS_METHODS_NEEDING_LENGTH = frozenset({"POST", "PUT", "PATCH"})
_PROXY_REASONS = frozenset(
    {"no_route", "no_cluster", "upstream_connect_failure", "upstream_overflow", "upstream_timeout", "upstream_reset"}
)


@dataclasses.dataclass
class ProxyStats:
    """Counters the admin endpoint exports. Plain ints: updated on the event loop thread only."""

    requests_total: int = 0
    requests_active: int = 0
    responses: Counter[str] = dataclasses.field(default_factory=Counter)
    """By status class: "2xx", "4xx"..."""
    local_replies: Counter[str] = dataclasses.field(default_factory=Counter)
    """By reason: no_route, upstream_connect_failure, upstream_timeout, upstream_reset,
    request_headers_too_large, request_payload_too_large, filter (a filter's own reply)..."""
    upstream_requests: int = 0
    upstream_retries: int = 0
    resets: Counter[str] = dataclasses.field(default_factory=Counter)
    websocket_upgrades: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    traffic: TrafficStats = dataclasses.field(default_factory=TrafficStats)
    """Requests by route, cluster and status class; upstream latency per cluster (sluice/proxy/metrics.py)."""

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "requests_active": self.requests_active,
            "responses": dict(self.responses),
            "local_replies": dict(self.local_replies),
            "upstream_requests": self.upstream_requests,
            "upstream_retries": self.upstream_retries,
            "resets": dict(self.resets),
            "websocket_upgrades": self.websocket_upgrades,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
        }


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


class _ProxyRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering oversized request heads with 431, not 400."""

    stats: ProxyStats | None = None

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        too_large = isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower()
        )
        if not too_large:
            return super().handle_error(request, status, exc, message)
        if self.stats is not None:
            self.stats.local_replies["request_headers_too_large"] += 1
            self.stats.responses["4xx"] += 1
        resp = web.Response(status=431, text="request headers too large\n", headers={"server": "sluice"})
        resp.force_close()
        return resp


class _ProxyServer(web.Server):
    def __init__(self, handler: Any, stats: ProxyStats, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.stats = stats

    def __call__(self) -> RequestHandler:
        handler = _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.stats = self.stats
        return handler


class _TunnelResponse(web.StreamResponse):
    """The 101 answer to an upgrade: headers through aiohttp, then raw bytes both ways."""

    def __init__(self, *, status: int, headers: CIMultiDict[str]) -> None:
        super().__init__(status=status, headers=headers)
        # Like aiohttp's WebSocketResponse: no framing of our own after the head.
        self._length_check = False
        self.force_close()

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class _ClientToUpstream:
    """Stands in for aiohttp's payload parser after an upgrade: relays client bytes upstream."""

    def __init__(self, conn: UpstreamConnection, closed: asyncio.Event) -> None:
        self._conn = conn
        self._closed = closed

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._conn.transport is not None and not self._conn.closed:
            self._conn.transport.write(data)
        return False, b""

    def feed_eof(self) -> None:
        self._conn.write_eof()
        self._closed.set()


class Exchange:
    """One request through the chain and, unless a filter or the router answers, the upstream."""

    request_ids: RequestIds | None = RequestIds()

    def __init__(self, gen: Generation, request: web.BaseRequest, stats: ProxyStats) -> None:
        self.gen = gen
        self.request = request
        self.stats = stats
        self.info = StreamInfo()
        self.chain: FilterChain | None = None
        self.response: web.StreamResponse | None = None
        self.pool: ClusterPool | None = None
        self.conn: UpstreamConnection | None = None
        # Hand-rolled signals instead of asyncio.Event: two Events per request showed up in
        # profiles, and most requests never wait on either.
        self._woken = False
        self._wake_waiter: asyncio.Future[None] | None = None
        self._busy = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._finished = False
        self._reset_reason: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._upgrade: str | None = None
        self._retryable = False
        self._request_head: tuple[str, str, list[tuple[str, str]], bool, int | None] | None = None
        self._start = time.monotonic_ns()

    @property
    def started_ns(self) -> int:
        """time.monotonic_ns() when the exchange began."""
        return self._start

    # -- entry ---------------------------------------------------------------------------------
    async def run(self) -> web.StreamResponse:
        request = self.request
        transport = request.transport
        info = self.info
        if transport is not None:
            peer = transport.get_extra_info("peername")
            sock = transport.get_extra_info("sockname")
            if peer:
                info.source_address = f"{peer[0]}:{peer[1]}"
            if sock:
                info.destination_address = f"{sock[0]}:{sock[1]}"
        info.protocol = f"HTTP/{request.version.major}.{request.version.minor}"
        headers = self._request_headers()
        if headers is None:
            return self._plain_reply(431, "request headers too large\n", "request_headers_too_large")
        info.request_headers = headers
        path = path_only(request.raw_path)
        chain = FilterChain(
            [(f.name, partial(f.plugin.new_stream, info)) for f in self.gen.filters_for(path)],
            max_body_buffer=self.gen.config.max_body_buffer,
        )
        self.chain = chain
        chain.on_actions = self._wakeup
        has_body = request.body_exists
        try:
            chain.request_headers(headers, not has_body)
            if has_body:
                self._spawn(self._read_client_body)
            await self._action_loop()
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client goes away.
            self.stats.resets["client_disconnect"] += 1
            chain.reset("client disconnected")
            raise
        finally:
            self._finish()
        resp = self.response
        if self._reset_reason is not None:
            # The transport is closed: whatever aiohttp tries to write next goes nowhere.
            self._abort_client()
            if resp is None:
                resp = web.Response(status=502)
                resp.force_close()
            return resp
        if resp is None:
            # The action loop ended without a response, which the chain should make impossible.
            return self._plain_reply(502, "no response\n", "no_response")
        return resp

    def _request_headers(self) -> HeaderMap | None:
        request = self.request
        raw = request.raw_headers
        size = len(request.method) + len(request.raw_path) + 12
        for name, value in raw:
            size += len(name) + len(value) + 4
        if size > self.gen.config.max_request_header_size:
            return None
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        headers, self._upgrade = downstream_request_headers(
            request.method,
            request.raw_path,
            request.headers.items(),
            str(peer[0]) if peer else "unknown",
            "http",
            self.request_ids,
        )
        return headers

    # -- the action loop -----------------------------------------------------------------------
    async def _action_loop(self) -> None:
        chain = self.chain
        assert chain is not None
        while not self._finished:
            actions = chain.take_actions()
            if not actions:
                if self._reset_reason is not None:
                    return
                self._set_idle()
                await self._wait_wakeup()
                continue
            self._busy = True
            i = 0
            while i < len(actions):
                action = actions[i]
                nxt = actions[i + 1] if i + 1 < len(actions) else None
                if (
                    isinstance(action, SendResponseHeaders)
                    and not action.end_of_stream
                    and isinstance(nxt, SendResponseData)
                    and nxt.end_of_stream
                ):
                    # The whole response is here: one write, Content-Length framing.
                    self._respond_whole(action.headers, nxt.data)
                    i += 2
                    continue
                await self._perform(action)
                i += 1
                if self._finished or self._reset_reason is not None:
                    return

    async def _perform(self, action: Action) -> None:
        if isinstance(action, ForwardRequestHeaders):
            await self._start_upstream(action.headers, action.end_of_stream)
        elif isinstance(action, ForwardRequestData):
            await self._send_upstream(action.data, action.end_of_stream)
        elif isinstance(action, ForwardRequestTrailers):
            if self.conn is not None:
                self.conn.end_request(action.trailers)
        elif isinstance(action, SendResponseHeaders):
            await self._send_headers(action.headers, action.end_of_stream)
        elif isinstance(action, SendResponseData):
            await self._send_data(action.data, action.end_of_stream)
        elif isinstance(action, SendResponseTrailers):
            # aiohttp's server cannot send trailers; the body ends here.
            await self._send_data(b"", True)
        elif isinstance(action, AbortUpstream):
            self._abort_upstream(action.reply)
        elif isinstance(action, ResetStream):
            self._reset_reason = action.reason
            self.stats.resets["filter"] += 1

    def _spawn(self, feeder: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(feeder))
        self._tasks.append(task)

    async def _guarded(self, feeder: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # A bug in a feeder must end the request, not leave the action loop waiting forever.
        # (The coroutine is made here, so a task cancelled before it ran leaves none behind.)
        try:
            await feeder()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request %s: internal error", self.request.raw_path)
            self._fail("internal error", "internal_error")

    async def _caught_up(self) -> None:
        """Wait until the action loop has performed everything produced so far."""
        while self._busy:
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _set_idle(self) -> None:
        self._busy = False
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _wakeup(self) -> None:
        self._woken = True
        waiter = self._wake_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait_wakeup(self) -> None:
        if not self._woken:
            waiter = asyncio.get_running_loop().create_future()
            self._wake_waiter = waiter
            try:
                await waiter
            finally:
                self._wake_waiter = None
        self._woken = False

    # -- request side ----------------------------------------------------------------------------
    async def _read_client_body(self) -> None:
        chain = self.chain
        assert chain is not None
        content = self.request.content
        try:
            expect = self.request.headers.get("expect", "")
            if expect.lower() == "100-continue" and self.request.version >= (1, 1):
                # aiohttp's low-level server leaves this to the application. The filters and the
                # upstream see the body as it streams, so there is nothing to wait for.
                await self.request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            while not chain.halted and not self._finished:
                await self._caught_up()
                chunk = await content.readany()
                eos = not chunk or content.at_eof()
                self.info.request_size += len(chunk)
                self.stats.bytes_received += len(chunk)
                chain.request_data(chunk, eos)
                if eos:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, web.HTTPException) as exc:
            self._fail(f"client body: {exc!r}", "client_disconnect")
        except Exception as exc:  # aiohttp's payload errors
            self._fail(f"client body: {exc!r}", "client_body_error")

    async def _start_upstream(self, headers: HeaderMap, eos: bool) -> None:
        chain = self.chain
        assert chain is not None
        method = headers.get(":method") or "GET"
        target = headers.get(":path") or "/"
        route = self.gen.router.match(method, target, headers)
        if route is None:
            self._local("no_route", 404, b"no route\n")
            return
        pool = self.gen.clusters.get(route.cluster)
        if pool is None:
            self._local("no_cluster", 503, b"no such cluster\n")
            return
        self.pool = pool
        self.info.route_name = route.name or ""
        self.info.cluster_name = route.cluster
        authority = pool.host_rewrite or headers.get(":authority") or ""
        fields: list[tuple[str, str]] = [("host", authority)]
        content_length: int | None = None
        for name, value in headers:
            if name[0] == ":" or name == "host" or name == "expect":
                continue
            if name == "content-length":
                if value.isdigit():
                    content_length = int(value)
                continue
            fields.append((name, value))
        if self._upgrade is not None:
            fields.append(("connection", "upgrade"))
            fields.append(("upgrade", self._upgrade))
        if eos and method in BODYLESS_METHODS_NEEDING_LENGTH:
            fields.append(("content-length", "0"))
        self._retryable = eos and method in IDEMPOTENT_METHODS
        self._request_head = (method, target, fields, not eos, content_length)
        if not await self._connect(fresh=False):
            return
        if eos and not chain.streams:
            # Nothing else can happen to this request until the upstream answers (the request
            # is complete and there is no filter that could raise an event meanwhile), so the
            # head is awaited right here instead of in a task of its own.
            await self._read_upstream(inline=True)
        else:
            self._spawn(self._read_upstream)

    async def _connect(self, *, fresh: bool) -> bool:
        pool = self.pool
        assert pool is not None and self._request_head is not None
        method, target, fields, body, content_length = self._request_head
        try:
            conn = await pool.acquire(retry=self._retryable, fresh=fresh)
        except PoolExhausted as exc:
            log.info("%s", exc)
            self._local("upstream_overflow", 503, b"upstream overflow\n")
            return False
        except ConnectFailed as exc:
            log.info("cluster %s: %s", pool.name, exc)
            self._local("upstream_connect_failure", 502, b"upstream connect error\n")
            return False
        if self._finished or self._reset_reason is not None or (self.chain and self.chain.halted):
            pool.release(conn)
            return False
        self.conn = conn
        self.info.upstream_address = conn.endpoint
        self.stats.upstream_requests += 1
        try:
            conn.start_request(method, target, fields, body=body, content_length=content_length)
        except UpstreamError:
            self._local("upstream_reset", 502, b"upstream connection closed\n")
            return False
        return True

    async def _send_upstream(self, data: bytes, eos: bool) -> None:
        conn = self.conn
        if conn is None:
            return  # no route or connect failure: the body has nowhere to go
        try:
            await conn.write_body(data, eos)
        except (UpstreamError, ConnectionError) as exc:
            # The upstream may already have answered (e.g. 413 before reading it all); let the
            # response reader decide, and stop sending.
            log.debug("upstream %s: request body: %r", conn.endpoint, exc)

    # -- response side ---------------------------------------------------------------------------
    async def _read_upstream(self, inline: bool = False) -> None:
        chain = self.chain
        pool = self.pool
        assert chain is not None and pool is not None
        retried = False
        while True:
            conn = self.conn
            assert conn is not None
            try:
                head = await conn.read_head(pool.timeout)
                break
            except UpstreamTimeout as exc:
                log.info("cluster %s: %s", pool.name, exc)
                self._drop_upstream()
                self._local("upstream_timeout", 504, b"upstream request timeout\n")
                return
            except UpstreamReset as exc:
                stale = exc.before_response and conn.requests > 1
                if stale and self._retryable and not retried:
                    # A kept-alive connection the upstream had closed meanwhile: nothing was
                    # processed, so the request goes again on a new connection.
                    retried = True
                    self.stats.upstream_retries += 1
                    self._drop_upstream()
                    if not await self._connect(fresh=True):
                        return
                    continue
                log.info("cluster %s: %s", pool.name, exc)
                self._drop_upstream()
                self._local("upstream_reset", 502, b"upstream connection closed before responding\n")
                return
        self.info.response_code = head.status
        self.info.backend_latency_ns = time.monotonic_ns() - self._start
        headers = head.headers
        strip_hop_by_hop(headers)
        if head.upgrade and self._upgrade is not None:
            headers.add("connection", "upgrade")
            headers.add("upgrade", self._upgrade)
        append_value(headers, "via", VIA)
        self.info.response_headers = headers
        eos = conn.response_complete or head.upgrade
        chain.response_headers(headers, eos)
        if eos:
            return
        if inline:
            # Usually the whole body came with the head; anything more streams from a task,
            # since the action loop (our caller) must be free to forward it.
            if conn.response_complete_after_buffered():
                data = await conn.read_body()
                chain.response_data(data or b"", True)
            else:
                self._spawn(self._read_upstream_body)
            return
        await self._read_upstream_body()

    async def _read_upstream_body(self) -> None:
        chain, pool, conn = self.chain, self.pool, self.conn
        assert chain is not None and pool is not None and conn is not None
        try:
            while not chain.halted and not self._finished:
                await self._caught_up()
                data = await conn.read_body()
                if data is None:
                    trailers = conn.response_trailers
                    if trailers is not None:
                        self.info.response_trailers = trailers
                        chain.response_trailers(trailers)
                    else:
                        chain.response_data(b"", True)
                    return
                chain.response_data(data, conn.response_complete)
                if conn.response_complete:
                    return
        except (UpstreamError, ConnectionError) as exc:
            log.info("cluster %s: response body: %s", pool.name, exc)
            self._drop_upstream()
            if chain.response_started:
                self._fail(f"upstream reset: {exc}", "upstream_reset")
            else:
                self._local("upstream_reset", 502, b"upstream connection closed\n")

    def _headers_for_client(self, headers: HeaderMap) -> tuple[int, CIMultiDict[str]]:
        status = int(headers.get(":status") or 502)
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in headers:
            if name[0] != ":":
                out.add(name, value)
        if "server" not in out:
            out["server"] = "sluice"
        return status, out

    def _respond_whole(self, headers: HeaderMap, body: bytes) -> None:
        status, fields = self._headers_for_client(headers)
        fields.pop("content-length", None)
        self.response = web.Response(status=status, headers=fields, body=body)
        self._count_response(status, len(body))
        self._finished = True

    async def _send_headers(self, headers: HeaderMap, eos: bool) -> None:
        status, fields = self._headers_for_client(headers)
        if status == 101 and self.conn is not None and self._upgrade is not None:
            await self._tunnel(status, fields)
            return
        resp = web.StreamResponse(status=status, headers=fields)
        if (
            "content-length" not in fields
            and self.request.method != "HEAD"
            and status not in (204, 304)
            and self.request.version >= (1, 1)
        ):
            resp.enable_chunked_encoding()
        self.response = resp
        try:
            await resp.prepare(self.request)
            if eos:
                await resp.write_eof()
        except ConnectionError as exc:
            self._fail(f"client: {exc!r}", "client_disconnect")
            return
        if eos:
            self._count_response(status, 0)
            self._finished = True
        else:
            self._status = status

    async def _send_data(self, data: bytes, eos: bool) -> None:
        resp = self.response
        if resp is None or self._finished:
            return
        try:
            if data:
                self.stats.bytes_sent += len(data)
                self.info.response_size += len(data)
                await resp.write(data)
            if eos:
                await resp.write_eof()
        except ConnectionError as exc:
            self._fail(f"client: {exc!r}", "client_disconnect")
            return
        if eos:
            self._count_response(resp.status, 0)
            self._finished = True

    def _count_response(self, status: int, size: int) -> None:
        self.info.response_code = status
        self.info.response_size += size
        self.stats.bytes_sent += size
        self.stats.responses[_status_class(status)] += 1

    # -- upgrades ------------------------------------------------------------------------------
    async def _tunnel(self, status: int, fields: CIMultiDict[str]) -> None:
        conn = self.conn
        assert conn is not None
        resp = _TunnelResponse(status=status, headers=fields)
        self.response = resp
        self.stats.websocket_upgrades += 1
        self._count_response(status, 0)
        await resp.prepare(self.request)
        client_closed = asyncio.Event()
        protocol = self.request.protocol
        protocol.set_parser(_ClientToUpstream(conn, client_closed))  # type: ignore[arg-type]
        writer = self.request.writer
        try:
            while True:
                data = await conn.read_raw()
                if data is None:
                    break
                await writer.write(data)
        except (UpstreamError, ConnectionError):
            pass
        finally:
            conn.close()
            self.conn = None
            if self.pool is not None:
                self.pool.release(conn)
            self._finished = True

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
        for task in self._tasks:
            if task is not asyncio.current_task() and not task.done():
                task.cancel()
        self._drop_upstream()

    def _drop_upstream(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and self.pool is not None:
            if not conn.reusable:
                conn.close()
            self.pool.release(conn)

    def _fail(self, reason: str, kind: str) -> None:
        """Abort the exchange: the response cannot be completed."""
        if self._reset_reason is None and not self._finished:
            self._reset_reason = reason
            self.stats.resets[kind] += 1
        if self.chain is not None:
            self.chain.reset(reason)
        self._wakeup()

    def _abort_client(self) -> None:
        protocol = self.request.protocol
        if protocol is not None:
            protocol.force_close()

    def _plain_reply(self, status: int, text: str, reason: str) -> web.Response:
        self.stats.local_replies[reason] += 1
        self.stats.responses[_status_class(status)] += 1
        resp = web.Response(status=status, text=text, headers={"server": "sluice"})
        resp.force_close()
        return resp

    def _finish(self) -> None:
        for task in self._tasks:
            if not task.done():
                task.cancel()
        conn = self.conn
        if conn is not None:
            # Keep-alive only if the whole exchange completed; otherwise the connection is in an
            # unknown state and is closed by release().
            self.conn = None
            if self.pool is not None:
                self.pool.release(conn)
        self._tasks.clear()
        if self.chain is not None:
            self.info.duration_ns = time.monotonic_ns() - self._start
            self.chain.complete()
        if not self._finished and self.response is not None and self._reset_reason is None:
            self.response.force_close()
        if not self.request.content.is_eof() and self.response is not None:
            # Unread request body (local reply, early upstream answer): do not reuse the connection.
            self.response.force_close()


class ProxyServer:
    """Listens and hands each request to an `Exchange` on the generation current at its start."""

    def __init__(
        self,
        current: Callable[[], Generation],
        stats: ProxyStats,
        *,
        max_request_header_size: int = 8192,
    ) -> None:
        self._current = current
        self.stats = stats
        self._server: asyncio.base_events.Server | None = None
        self._web: _ProxyServer | None = None
        limit = max(max_request_header_size, 8190)
        self._limits = {"max_line_size": limit, "max_field_size": limit, "max_headers": 1024}
        self._draining = False
        self.access_log = False
        self.reuse_port = False
        """SO_REUSEPORT: each worker process binds its own socket on the same address (Linux)."""

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._web = _ProxyServer(
            self._handle,
            self.stats,
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=75.0,
            **self._limits,
        )
        self._server = await loop.create_server(
            self._web, host, port, reuse_address=True, reuse_port=self.reuse_port or None, backlog=1024
        )
        sock = self._server.sockets[0].getsockname()
        return str(sock[0]), int(sock[1])

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        gen = self._current()
        gen.acquire()
        stats = self.stats
        stats.requests_total += 1
        stats.requests_active += 1
        exchange = Exchange(gen, request, stats)
        try:
            resp = await exchange.run()
            if self._draining:
                resp.force_close()
            return resp
        finally:
            stats.requests_active -= 1
            gen.release()
            info = exchange.info
            latency = info.backend_latency_ns
            stats.traffic.observe(
                info.route_name, info.cluster_name, info.response_code, latency / 1e9 if latency else None
            )
            if self.access_log:
                self._log_access(exchange, gen)

    @staticmethod
    def _log_access(exchange: Exchange, gen: Generation) -> None:
        info = exchange.info
        request = exchange.request
        chain = exchange.chain
        headers = info.request_headers
        local = chain.local_reply if chain is not None else None
        record = access_record(
            start_ns=info.start_time_ns,
            method=request.method,
            path=request.raw_path,
            status=info.response_code,
            bytes_sent=info.response_size,
            bytes_received=info.request_size,
            duration_ns=info.duration_ns or time.monotonic_ns() - exchange.started_ns,
            upstream=info.upstream_address,
            cluster=info.cluster_name,
            route=info.route_name,
            variant=headers.get(gen.variant_header) if headers is not None else None,
            filters=chain.acted_filters() if chain is not None else (),
            source=info.source_address,
            local_reply=(local.details or "filter") if local is not None else None,
        )
        access_log.info("%s", access_line(record))

    async def stop_accepting(self) -> None:
        self._draining = True
        if self._server is not None:
            self._server.close()
        if self._web is not None:
            # Idle keep-alive connections close now; busy ones after their current request.
            for conn in self._web.connections:
                conn.close()

    async def shutdown(self, timeout: float) -> None:
        """Wait up to `timeout` for in-flight requests, then cut the rest."""
        await self.stop_accepting()
        if self._web is not None:
            await self._web.shutdown(timeout)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])
