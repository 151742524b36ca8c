"""`ProxyServer`: the proxy's listener, its connections, graceful drain and per-request accounting.

Each accepted connection is a `DownstreamConnection` (downstream.py) that parses requests and
starts one `Exchange` (exchange.py) per request, on the generation current at its start. When an
exchange ends, `ended` counts it and writes its access log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .downstream import ClientLimits, DownstreamConnection, RequestHead, ServedConnection
from .downstream_h2 import H2ClientConnection, H2Listener
from .exchange import Exchange, ExchangeClient
from .h1 import HttpDate
from .http import RequestIds
from .http2.events import H2Limits
from .http2.select import ProtocolSelector
from .listener import TlsDownstreamConnection, TlsListener
from .logs import AccessLog, access_record
from .redirect import HttpsRedirect, RedirectListener
from .stats import ProxyStats
from .tls.acceptor import TlsAcceptor
from .tls.server import ALPN_H2, ServerTls

if TYPE_CHECKING:
    from .generation import Generation

log = logging.getLogger("sluice.server")


class ProxyServer:
    """Listens and hands each request to an `Exchange` on the generation current at its start."""

    def __init__(
        self,
        current: Callable[[], Generation],
        stats: ProxyStats,
        *,
        max_request_header_size: int = 8192,
        access_log: AccessLog | None = None,
    ) -> None:
        self._current = current
        self.stats = stats
        self.max_request_header_size = max_request_header_size
        self.access_log = access_log
        """Where access log lines go (sluice/proxy/logs.py), or None: no line, no per-request work."""
        self.request_ids: RequestIds | None = RequestIds()
        self.date = HttpDate()
        self.connections: set[ServedConnection] = set()
        self._server: asyncio.base_events.Server | None = None
        """The first listener (`port`)."""
        self._servers: list[asyncio.base_events.Server] = []
        self.tls_listeners: list[TlsListener] = []
        self.http2_listeners: list[H2Listener] = []
        """Listeners that speak HTTP/2 (ALPN `h2`, or h2c), with their counters."""
        self._draining = False
        self._all_closed: asyncio.Future[None] | None = None
        self.reuse_port = False
        """SO_REUSEPORT: each worker process binds its own socket on the same address (Linux)."""
        self._limits = ClientLimits(header_size=max_request_header_size)
        self._limits_of: Generation | None = None

    @property
    def tracks_headers(self) -> bool:
        return self.access_log is not None

    async def start(
        self,
        host: str,
        port: int,
        tls: ServerTls | None = None,
        redirect: HttpsRedirect | None = None,
        *,
        h2c: bool = False,
        http2: H2Limits | None = None,
    ) -> tuple[str, int]:
        """Listen on one more address (plain, or TLS with `tls`; plain answering every request
        with a redirect to https with `redirect`); returns the bound address.

        HTTP/2 is served where ALPN offers `h2` (TLS) or with `h2c` (plain, prior knowledge;
        HTTP/1.1 still served beside it), with `http2` as its limits."""
        loop = asyncio.get_running_loop()
        listener: TlsListener | None = None
        http1: Callable[[], asyncio.Protocol]
        if redirect is not None:
            owner = RedirectListener(self, redirect)
            http1 = lambda: DownstreamConnection(owner)  # noqa: E731
            h2c = False  # a redirect listener answers HTTP/1.1 only
        elif tls is None:
            http1 = lambda: DownstreamConnection(self)  # noqa: E731
        else:
            secure = listener = TlsListener(f"{host}:{port}", tls)
            http1 = lambda: TlsDownstreamConnection(self, secure)  # noqa: E731
        h2_listener: H2Listener | None = None
        app: Callable[[], asyncio.Protocol] = http1
        if (ALPN_H2 in tls.settings.alpn) if tls is not None else h2c:
            h2_side = h2_listener = H2Listener(f"{host}:{port}", http2 or H2Limits())

            def h2_connection() -> asyncio.Protocol:
                return H2ClientConnection(self, h2_side, listener)

            def select() -> asyncio.Protocol:
                return ProtocolSelector(http1, h2_connection, h2c=tls is None)

            app = select

        factory: Callable[[], asyncio.Protocol]
        if listener is None:
            factory = app
        else:
            accepting = listener

            def factory() -> asyncio.Protocol:
                return TlsAcceptor(accepting.tls, app, accepting.handshakes)

        server = await loop.create_server(
            factory, host, port, reuse_address=True, reuse_port=self.reuse_port or None, backlog=1024
        )
        if self._server is None:
            self._server = server
        self._servers.append(server)
        sock = server.sockets[0].getsockname()
        address = str(sock[0]), int(sock[1])
        if listener is not None:
            listener.name = f"{address[0]}:{address[1]}"
            self.tls_listeners.append(listener)
        if h2_listener is not None:
            h2_listener.name = f"{address[0]}:{address[1]}"
            self.http2_listeners.append(h2_listener)
        return address

    # -- requests ------------------------------------------------------------------------------
    def limits(self) -> ClientLimits:
        """What client connections enforce, from the current generation (a reload changes it)."""
        try:
            gen = self._current()
        except RuntimeError:  # not started
            return ClientLimits(header_size=self.max_request_header_size)
        if gen is not self._limits_of:
            config = gen.config
            timeouts = config.timeouts
            self._limits = ClientLimits(
                config.max_request_header_size, timeouts.request_headers, timeouts.request_body_idle, timeouts.stream
            )
            self._limits_of = gen
        return self._limits

    def begin(self, client: ExchangeClient, head: RequestHead) -> Exchange:
        """A request arrived on `client`: its exchange, on the current generation (not started)."""
        gen = self._current()
        gen.acquire()
        stats = self.stats
        stats.requests_total += 1
        stats.requests_active += 1
        if self._draining:
            client.closing = True
        return Exchange(self, client, head, gen)

    def ended(self, exchange: Exchange) -> None:
        """The exchange is over (response complete, or cut): count it, log it."""
        stats = self.stats
        stats.requests_active -= 1
        gen = exchange.gen
        gen.release()
        info = exchange.info
        latency = info.backend_latency_ns
        seconds = latency / 1e9 if latency else None
        stats.traffic.observe(info.route_name, info.cluster_name, info.response_code, seconds)
        if self.access_log is not None:
            self._log_access(exchange, gen, self.access_log)

    @staticmethod
    def _log_access(exchange: Exchange, gen: Generation, sink: AccessLog) -> None:
        info = exchange.info
        head = exchange.head
        chain = exchange.chain
        headers = info.request_headers
        local = chain.local_reply if chain is not None else None
        # Positional: this runs for every request.
        record = access_record(
            info.start_time_ns,
            head.method,
            head.target,
            info.response_code,
            info.response_size,
            info.request_size,
            info.duration_ns or time.monotonic_ns() - exchange.started_ns,
            info.upstream_address,
            info.cluster_name,
            info.route_name,
            headers.get(gen.variant_header) if headers is not None else None,
            chain.acted_filters() if chain is not None else [],
            info.source_address,
            (local.details or "filter") if local is not None else None,
        )
        sink.write(record)

    # -- connections -----------------------------------------------------------------------------
    def connection_closed(self, client: ServedConnection) -> None:
        self.connections.discard(client)
        if not self.connections and self._all_closed is not None and not self._all_closed.done():
            self._all_closed.set_result(None)

    async def stop_accepting(self) -> None:
        """Stop listening; idle keep-alive connections close now, busy ones after their response."""
        self._draining = True
        for server in self._servers:
            server.close()
        for client in list(self.connections):
            client.drain()

    async def shutdown(self, timeout: float) -> None:
        """Wait up to `timeout` for in-flight requests, then cut the rest; flush the access log."""
        await self.stop_accepting()
        if self.connections:
            self._all_closed = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._all_closed), timeout)
            except TimeoutError:
                log.info("drain timeout: cutting %d connections", len(self.connections))
                for client in list(self.connections):
                    client.abort()
        for server in self._servers:
            await server.wait_closed()
        if self.access_log is not None:
            self.access_log.close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])
