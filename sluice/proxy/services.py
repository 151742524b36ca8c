"""`Services`: the `abi.Host` the proxy gives every filter (callouts, timers, logs).

Callouts (`proxy_http_call`) go through the same `ClusterPool`s as proxied traffic, looked up in
the generation that is current when the call starts. An upstream that is not a cluster name but
`host:port` (filters written for hosts that take addresses) gets a pool of its own, created on
first use and kept for the life of the process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from sluice.abi import CallResponse, Cancellable, HeaderMap, LogLevel

from .clusters import ClusterPool
from .config import HostPort
from .http import upstream_request
from .logs import FilterLogs
from .redis_host import RedisClients
from .upstream import ResponseHead, UpstreamError, UpstreamLease

if TYPE_CHECKING:
    from .generation import Generation

log = logging.getLogger("sluice.services")

MAX_CALL_RESPONSE = 16 << 20  # a callout answer is held in memory whole; bound it


def _upstream_address(text: str) -> tuple[str, int] | None:
    """A callout upstream written as `host:port` (not a cluster name), parsed like the config."""
    try:
        address = HostPort.parse(text)
    except ValueError:
        return None
    return (address.host, address.port) if address.port > 0 else None


class _Collected:
    """A callout's `ResponseSink`: the whole response, held in memory (bounded), as one future."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: UpstreamLease) -> None:
        self.response: asyncio.Future[CallResponse] = loop.create_future()
        self._conn = conn
        self._head: ResponseHead | None = None
        self._chunks: list[bytes] = []
        self._size = 0

    def upstream_response(self, head: ResponseHead | None, body: bytes, complete: bool) -> None:
        if self.response.done():
            return
        if head is not None:
            self._head = head
        if body:
            self._size += len(body)
            if self._size > MAX_CALL_RESPONSE:
                self.response.set_exception(UpstreamError(f"callout response larger than {MAX_CALL_RESPONSE} bytes"))
                return
            self._chunks.append(body)
        if complete and self._head is not None:
            trailers = self._conn.response_trailers or HeaderMap()
            self.response.set_result(CallResponse(self._head.headers, b"".join(self._chunks), trailers))

    def upstream_failed(self, exc: UpstreamError) -> None:
        if not self.response.done():
            self.response.set_exception(exc)

    def upstream_writable(self) -> None:
        pass


class Services:
    """The proxy's `abi.Host`. All methods run on the event loop thread."""

    def __init__(self, current: Callable[[], Generation | None], loop: asyncio.AbstractEventLoop) -> None:
        self._current = current
        self._loop = loop
        self._named: dict[str, ClusterPool] = {}
        """Clusters by name outside any generation (the single-filter rig of `sluice filter test`)."""
        self._adhoc: dict[str, ClusterPool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0
        self.call_failures = 0
        self.filter_logs = FilterLogs(call_later=loop.call_later)
        """Filter log lines, rate-limited per filter (sluice/proxy/logs.py)."""
        self.redis = RedisClients(loop)
        """`type: redis` clusters for proxy_redis_call (sluice/proxy/redis_host.py)."""

    def add_pool(self, pool: ClusterPool) -> None:
        """Serve callouts to `pool.name` from `pool`, outside any generation."""
        old = self._named.pop(pool.name, None)
        if old is not None:
            old.close()
        self._named[pool.name] = pool

    # -- abi.Host ------------------------------------------------------------------------------
    def http_call(
        self,
        upstream: str,
        headers: HeaderMap,
        body: bytes,
        trailers: HeaderMap,
        timeout_s: float | None,
        on_response: Callable[[CallResponse | None], None],
    ) -> bool:
        pool = self._pool_for(upstream)
        if pool is None:
            return False
        self.calls += 1
        task = self._loop.create_task(self._call(pool, headers, body, timeout_s, on_response))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Cancellable:
        def run() -> None:
            try:
                callback()
            except Exception:
                log.exception("timer callback failed")

        return self._loop.call_later(max(delay_s, 0.0), run)

    def log(self, plugin: str, level: LogLevel, message: str) -> None:
        self.filter_logs.log(plugin, level, message)

    # -- abi.RedisHost (Higress's Redis calls) ---------------------------------------------------------
    def redis_init(self, cluster: str, username: str, password: str, timeout_s: float | None) -> bool:
        return self.redis.init(cluster, username, password, timeout_s)

    def redis_call(self, cluster: str, query: bytes, on_response: Callable[[bytes | None, int], None]) -> bool:
        return self.redis.call(cluster, query, on_response)

    # -- internals -----------------------------------------------------------------------------
    def _pool_for(self, upstream: str) -> ClusterPool | None:
        gen = self._current()
        if gen is not None:
            pool = gen.clusters.get(upstream)
            if pool is not None:
                return pool
        pool = self._named.get(upstream) or self._adhoc.get(upstream)
        if pool is not None:
            return pool
        address = _upstream_address(upstream)
        if address is None:
            return None
        pool = ClusterPool(upstream, [address], timeout=15.0, connect_timeout=2.0, max_connections=64)
        self._adhoc[upstream] = pool
        return pool

    async def _call(
        self,
        pool: ClusterPool,
        headers: HeaderMap,
        body: bytes,
        timeout_s: float | None,
        on_response: Callable[[CallResponse | None], None],
    ) -> None:
        try:
            timeout = timeout_s if timeout_s else None
            response = await asyncio.wait_for(self._exchange(pool, headers, body), timeout)
        except (UpstreamError, OSError, TimeoutError) as exc:
            self.call_failures += 1
            log.info("callout to %s failed: %s", pool.name, exc or type(exc).__name__)
            response = None
        try:
            on_response(response)
        except Exception:
            log.exception("callout response handler failed")

    async def _exchange(self, pool: ClusterPool, headers: HeaderMap, body: bytes) -> CallResponse:
        request = upstream_request(
            headers,
            default_authority=pool.name,
            host_rewrite=pool.host_rewrite,
            end_of_stream=not body,
            body_length=len(body),
        )
        conn = await pool.acquire(retry=request.retryable)
        try:
            collected = _Collected(self._loop, conn)
            conn.start_request(request, collected, pool.timeout, body, end=True)
            return await collected.response
        finally:
            conn.detach()
            pool.release(conn)

    def close(self) -> None:
        self.redis.close()
        self.filter_logs.flush()
        self.filter_logs.close()
        for task in list(self._tasks):
            task.cancel()
        for pool in (*self._adhoc.values(), *self._named.values()):
            pool.close()
        self._adhoc.clear()
        self._named.clear()
