"""`ClusterPool`: the connections to one cluster's endpoints.

* round-robin over endpoints, skipping the ones that recently failed to connect (passive health:
  5 s after the first failure, doubling up to 60 s; a success clears it). When every endpoint is
  marked down the least recently failed one is tried anyway, like Envoy's panic mode: a wrong
  guess costs one connect attempt, refusing would cost the request.
* keep-alive: finished connections wait in a per-endpoint idle list, newest first.
* `max_connections` bounds the connections in use at once; further requests wait for one.
* `upload_connections` bounds those of them held by requests whose body is still coming (an
  upload slot is taken with the connection and given back when the body has been sent), so
  clients that trickle their bodies cannot hold every connection.

`H2ClusterPool` (`protocol: http2`) leases streams instead: one multiplexed connection per
endpoint, replaced when it dies or the upstream sends GOAWAY; there `max_connections` bounds the
requests in flight on the cluster (Envoy's `max_requests` for HTTP/2).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .config import ClusterConfig, format_host_port
from .http2.upstream import H2UpstreamConnection, H2UpstreamStream, open_h2_connection
from .tls.certs import CertificateError
from .tls.client import ClientTlsSettings, build_client_context
from .tls.server import ALPN_H2
from .upstream import ConnectFailed, UpstreamConnection, UpstreamLease, UpstreamReset, open_connection

_Conn = TypeVar("_Conn", UpstreamConnection, H2UpstreamConnection)


class PoolExhausted(ConnectFailed):
    """`max_connections` were in use for longer than the connect timeout."""


DOWN_FIRST_S = 5.0
DOWN_MAX_S = 60.0
MAX_IDLE_PER_ENDPOINT = 256


class Slots:
    """A counting semaphore whose uncontended take is a plain call: a request that finds a free
    connection slot (nearly all of them) pays for no coroutine. Waiters are served in order, and a
    slot given back goes straight to the first of them."""

    __slots__ = ("free", "_waiters")

    def __init__(self, count: int) -> None:
        self.free = count
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_take(self) -> bool:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def take(self, timeout: float) -> bool:
        """Wait up to `timeout` for a slot; False when none came."""
        if self.try_take():
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
            return True
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over just as the wait ended: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                return False
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class Endpoint:
    __slots__ = ("host", "port", "label", "failures", "down_until", "idle")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.label = format_host_port(host, port)
        self.failures = 0
        self.down_until = 0.0
        self.idle: list[UpstreamConnection] = []

    def healthy(self, now: float) -> bool:
        return now >= self.down_until


class ClusterPool:
    alpn: tuple[str, ...] | None = None
    """What TLS connections offer, when the protocol decides it (else the `tls` settings')."""

    def __init__(
        self,
        name: str,
        endpoints: list[tuple[str, int]],
        *,
        timeout: float = 15.0,
        connect_timeout: float = 2.0,
        host_rewrite: str | None = None,
        max_connections: int = 256,
        upload_connections: int | None = None,
        idle_timeout: float | None = 60.0,
        request_body_prebuffer: int = 64 * 1024,
        clock: Callable[[], float] = time.monotonic,
        tls: ClientTlsSettings | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError(f"cluster {name}: no endpoints")
        self.name = name
        self.endpoints = [Endpoint(host, port) for host, port in endpoints]
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.host_rewrite = host_rewrite
        self.max_connections = max_connections
        self.upload_connections = upload_connections or max(1, max_connections // 2)
        self.idle_timeout = idle_timeout
        self.request_body_prebuffer = request_body_prebuffer
        self._clock = clock
        self._next = 0
        self._slots = Slots(max_connections)
        self._upload_slots = Slots(self.upload_connections)
        self._closed = False
        self.connects = 0
        self.connect_failures = 0
        self.reuses = 0
        self.overflows = 0
        self._ssl: ssl.SSLContext | None = None
        self._tls_error: str | None = None
        """The cluster's TLS files no longer load (they did when the config did): connects fail."""
        if tls is not None and self.alpn is not None and tls.alpn != self.alpn:
            tls = dataclasses.replace(tls, alpn=self.alpn)
        self.tls = tls
        if tls is not None:
            try:
                self._ssl = build_client_context(tls)
            except CertificateError as exc:
                self._tls_error = str(exc)

    @classmethod
    def from_config(cls, name: str, config: ClusterConfig) -> ClusterPool:
        """The pool for a configured cluster (an `H2ClusterPool` for `protocol: http2`)."""
        kind = H2ClusterPool if config.protocol == "http2" else ClusterPool
        return kind(
            name,
            [(hp.host, hp.port) for hp in config.endpoints],
            timeout=config.timeout,
            connect_timeout=config.connect_timeout,
            host_rewrite=config.host_rewrite,
            max_connections=config.max_connections,
            tls=config.tls.settings() if config.tls is not None else None,
            upload_connections=config.upload_connections,
            idle_timeout=config.idle_timeout,
            request_body_prebuffer=config.request_body_prebuffer,
        )

    # -- endpoint choice ---------------------------------------------------------------------
    def pick(self, exclude: Endpoint | None = None) -> Endpoint:
        now = self._clock()
        count = len(self.endpoints)
        for step in range(count):
            endpoint = self.endpoints[(self._next + step) % count]
            if endpoint is not exclude and endpoint.healthy(now):
                self._next = (self._next + step + 1) % count
                return endpoint
        others = [e for e in self.endpoints if e is not exclude] or self.endpoints
        return min(others, key=lambda e: e.down_until)

    def _mark_failed(self, endpoint: Endpoint) -> None:
        endpoint.failures += 1
        backoff = min(DOWN_FIRST_S * (2 ** (endpoint.failures - 1)), DOWN_MAX_S)
        endpoint.down_until = self._clock() + backoff
        # Idle connections to a host that refuses new ones are likely dead too.
        for conn in endpoint.idle:
            conn.close()
        endpoint.idle.clear()

    # -- leases --------------------------------------------------------------------------------
    async def acquire(self, *, retry: bool = False, fresh: bool = False, upload: bool = False) -> UpstreamLease:
        """A connection ready for one exchange; `release()` it afterwards, always.

        `retry`: after a connect failure, try once more on another endpoint (idempotent requests).
        `fresh`: do not reuse an idle connection (a retry after a stale keep-alive connection).
        `upload`: the request body is still coming; an upload slot is taken too (waited for like
        a connection), given back by `upload_done()`.
        Raises ConnectFailed.
        """
        if self._closed:
            raise ConnectFailed(f"cluster {self.name} is shut down")
        if not upload:
            return await self._lease(retry, fresh)
        await self._take(self._upload_slots, f"{self.upload_connections} upload connections")
        try:
            return await self._lease(retry, fresh)
        except BaseException:
            self._upload_slots.release()
            raise

    def upload_done(self) -> None:
        """A request that took its connection with `upload=True` has sent its whole body."""
        self._upload_slots.release()

    async def _take(self, slots: Slots, what: str) -> None:
        # Every slot busy: wait for one like for a connect, then give up (503).
        if not await slots.take(self.connect_timeout):
            self.overflows += 1
            raise PoolExhausted(f"cluster {self.name}: all {what} busy for {self.connect_timeout:g}s")

    def lease_idle(self, *, upload: bool) -> UpstreamConnection | None:
        """What `acquire(upload=upload)` would give when it need not wait: an idle connection to
        the next endpoint in turn, with free slots. None: `acquire()` (a connect, or a wait)."""
        if self._closed:
            return None
        endpoint = self.endpoints[self._next]
        if not endpoint.idle or not endpoint.healthy(self._clock()):
            return None
        if not self._slots.try_take():
            return None
        if upload and not self._upload_slots.try_take():
            self._slots.release()
            return None
        conn = self._reuse_idle(endpoint)
        if conn is not None:
            self._next = (self._next + 1) % len(self.endpoints)
            return conn
        self._slots.release()
        if upload:
            self._upload_slots.release()
        return None

    def _reuse_idle(self, endpoint: Endpoint) -> UpstreamConnection | None:
        """The newest idle connection to `endpoint` still open, made ready for an exchange."""
        idle = endpoint.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reset_for_next()
                self.reuses += 1
                return conn
        return None

    async def _lease(self, retry: bool, fresh: bool) -> UpstreamLease:
        await self._take(self._slots, f"{self.max_connections} connections")
        try:
            endpoint = self.pick()
            try:
                return await self._connect(endpoint, fresh)
            except ConnectFailed:
                if not retry or len(self.endpoints) < 2:
                    raise
                return await self._connect(self.pick(exclude=endpoint), fresh)
        except BaseException:
            self._slots.release()
            raise

    async def _connect(self, endpoint: Endpoint, fresh: bool) -> UpstreamLease:
        if not fresh:
            conn = self._reuse_idle(endpoint)
            if conn is not None:
                return conn
        return await self._dial(endpoint, open_connection)

    async def _dial(
        self,
        endpoint: Endpoint,
        opener: Callable[[str, int, float, ssl.SSLContext | None, str | None], Awaitable[_Conn]],
    ) -> _Conn:
        """A new connection to `endpoint` (TLS when the cluster has it); counts and marks failures."""
        self.connects += 1
        try:
            if self.tls is None:
                conn = await opener(endpoint.host, endpoint.port, self.connect_timeout, None, None)
            else:
                if self._tls_error is not None:
                    raise ConnectFailed(f"cluster {self.name}: TLS: {self._tls_error}")
                conn = await opener(
                    endpoint.host, endpoint.port, self.connect_timeout, self._ssl,
                    self.tls.server_hostname(endpoint.host),
                )
        except ConnectFailed:
            self.connect_failures += 1
            self._mark_failed(endpoint)
            raise
        endpoint.failures = 0
        endpoint.down_until = 0.0
        return conn

    def release(self, conn: UpstreamLease) -> None:
        """Give a connection back: kept for reuse if the exchange ended cleanly, else closed."""
        self._slots.release()
        if self._closed or not conn.reusable:
            conn.close()
            return
        for endpoint in self.endpoints:
            if endpoint.label == conn.endpoint:
                if len(endpoint.idle) < MAX_IDLE_PER_ENDPOINT:
                    assert isinstance(conn, UpstreamConnection)  # this pool leases only those
                    endpoint.idle.append(conn)
                    return
                break
        conn.close()

    def idle_connections(self) -> int:
        return sum(len(e.idle) for e in self.endpoints)

    def close(self) -> None:
        """Close idle connections now; leased ones close when released."""
        self._closed = True
        for endpoint in self.endpoints:
            for conn in endpoint.idle:
                conn.close()
            endpoint.idle.clear()


class H2ClusterPool(ClusterPool):
    """`protocol: http2`: a lease is a stream of the endpoint's one multiplexed connection.

    The connection is made on first use (concurrent first requests share the connect) and
    replaced once it is no longer usable (closed, GOAWAY received, stream ids spent); the one it
    replaces finishes its streams and closes. A request waits up to the connect timeout for a
    stream while the upstream's MAX_CONCURRENT_STREAMS are all in use.
    """

    alpn = (ALPN_H2,)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h2: dict[str, H2UpstreamConnection] = {}
        self._h2_connecting: dict[str, asyncio.Future[H2UpstreamConnection]] = {}

    async def _connect(self, endpoint: Endpoint, fresh: bool) -> UpstreamLease:
        # `fresh` (a retry after a stale connection) needs nothing more: a connection that lost
        # a stream that way is no longer usable, so a new one is made.
        for _ in range(3):
            conn = await self._connection(endpoint)
            try:
                stream = await conn.lease(self.connect_timeout)
            except UpstreamReset:
                continue  # it went away while we waited for a stream: the next one
            except ConnectFailed as exc:
                # Every stream the upstream allows stayed busy: an overflow (503), not a failure
                # of the endpoint.
                self.overflows += 1
                raise PoolExhausted(f"cluster {self.name}: {exc}") from None
            if conn.requests:
                self.reuses += 1
            return stream
        raise ConnectFailed(f"cluster {self.name}: HTTP/2 connections to {endpoint.label} keep going away")

    async def _connection(self, endpoint: Endpoint) -> H2UpstreamConnection:
        label = endpoint.label
        conn = self._h2.get(label)
        if conn is not None and conn.usable:
            return conn
        connecting = self._h2_connecting.get(label)
        if connecting is None:
            connecting = asyncio.ensure_future(self._open(endpoint))
            self._h2_connecting[label] = connecting
            connecting.add_done_callback(_forget_when_done(self._h2_connecting, label))
        # Shielded: a request that gives up must not cancel the connect others wait for.
        return await asyncio.shield(connecting)

    async def _open(self, endpoint: Endpoint) -> H2UpstreamConnection:
        conn = await self._dial(endpoint, open_h2_connection)
        conn.on_idle = self._connection_idle
        old = self._h2.get(endpoint.label)
        self._h2[endpoint.label] = conn
        if old is not None and old.leased == 0:
            old.close()
        return conn

    def _connection_idle(self, conn: H2UpstreamConnection) -> None:
        if self._closed or self._h2.get(conn.endpoint) is not conn:
            conn.close()

    def release(self, conn: UpstreamLease) -> None:
        self._slots.release()
        assert isinstance(conn, H2UpstreamStream)  # this pool leases only those
        conn.release()

    def idle_connections(self) -> int:
        return sum(1 for c in self._h2.values() if not c.closed and c.leased == 0)

    def close(self) -> None:
        """Close connections without streams now; the others once their streams are done."""
        super().close()
        for conn in self._h2.values():
            if conn.leased == 0:
                conn.close()


def _forget_when_done(
    table: dict[str, asyncio.Future[H2UpstreamConnection]], label: str
) -> Callable[[asyncio.Future[H2UpstreamConnection]], None]:
    """A done-callback that forgets a finished connect (and retrieves its error, which the
    requests that waited on it have seen, or none waited)."""

    def done(future: asyncio.Future[H2UpstreamConnection]) -> None:
        if table.get(label) is future:
            del table[label]
        if not future.cancelled():
            future.exception()

    return done
