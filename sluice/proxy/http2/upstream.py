"""HTTP/2 towards an upstream: one multiplexed connection per endpoint, one exchange per stream.

`H2UpstreamExchange` has the per-exchange interface of the HTTP/1.1 `UpstreamConnection`
(`start_request`, `write_body`, `end_request`, `read_head`, `read_body`, `response_trailers`,
`response_complete`, `reusable`, `close`) and raises the same errors, so the exchange code can
drive either. What differs is the lease: an HTTP/1.1 connection carries one exchange at a
time, an `H2UpstreamConnection` carries up to the peer's MAX_CONCURRENT_STREAMS, and
`H2Endpoint` keeps one such connection per endpoint (replacing it when it dies or is told to go
away).

Flow control: a response body's window is reopened only as `read_body` hands bytes on; a
request body is sent only as far as the upstream's windows allow (`write_body` waits).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Iterable
from typing import cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from sluice.abi import HeaderMap

from ..config import format_host_port
from ..upstream import ConnectFailed, ResponseHead, UpstreamReset, UpstreamTimeout

# Fields that describe an HTTP/1.1 connection; RFC 9113 8.2.2 forbids them in HTTP/2.
_CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", "content-length"}
)
STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 4 * 1024 * 1024
_RETRYABLE_CODES = frozenset({h2.errors.ErrorCodes.REFUSED_STREAM})


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def request_headers(
    method: str, scheme: str, target: str, fields: Iterable[tuple[str, str]], content_length: int | None
) -> list[tuple[str, str]]:
    """HTTP/1.1-shaped request fields (with `host`) as an HTTP/2 header list."""
    authority = ""
    regular: list[tuple[str, str]] = []
    for name, value in fields:
        name = name.lower()
        if name == "host":
            authority = value
        elif name == "te":
            if value.strip().lower() == "trailers":
                regular.append(("te", "trailers"))  # the only TE value HTTP/2 allows (gRPC needs it)
        elif name not in _CONNECTION_SPECIFIC and not name.startswith(":"):
            regular.append((name, value))
    head = [(":method", method), (":scheme", scheme), (":authority", authority), (":path", target)]
    if method == "CONNECT":
        head = [(":method", method), (":authority", authority or target)]
    if content_length is not None:
        regular.append(("content-length", str(content_length)))
    return head + regular


class H2UpstreamExchange:
    """One request/response on a stream of an `H2UpstreamConnection`."""

    def __init__(self, connection: H2UpstreamConnection) -> None:
        self.connection = connection
        self.endpoint = connection.endpoint
        self.stream_id = 0
        self._loop = connection.loop
        self._head: ResponseHead | None = None
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._body_waiter: asyncio.Future[None] | None = None
        self._window_waiter: asyncio.Future[None] | None = None
        self._trailers: HeaderMap | None = None
        self._message_done = False
        self._request_done = False
        self._error: UpstreamReset | None = None
        self._released = False

    # -- request side ----------------------------------------------------------------------------
    def start_request(
        self, method: str, target: str, fields: list[tuple[str, str]], *, body: bool, content_length: int | None
    ) -> None:
        self.connection.start(self, method, target, fields, body=body, content_length=content_length)
        self._request_done = not body

    async def write_body(self, data: bytes, end: bool) -> None:
        conn = self.connection
        view = memoryview(data)
        while view:
            self._check_alive("while sending the body")
            window = conn.send_window(self.stream_id)
            if window <= 0:
                self._window_waiter = self._loop.create_future()
                try:
                    await self._window_waiter
                finally:
                    self._window_waiter = None
                continue
            piece = view[:window]
            view = view[window:]
            conn.send_data(self.stream_id, bytes(piece), end_stream=end and not view)
            await conn.drain()
        if end and not data:
            self.end_request()
        elif end:
            self._request_done = True

    def end_request(self, trailers: HeaderMap | None = None) -> None:
        if self._request_done or self._error is not None:
            return
        self._request_done = True
        fields = [(k, v) for k, v in (trailers or ()) if not k.startswith(":")]
        self.connection.end_stream(self.stream_id, fields or None)

    # -- response side ---------------------------------------------------------------------------
    async def read_head(self, timeout: float | None) -> ResponseHead:
        if self._head is not None:
            return self._head
        if self._error is not None:
            raise self._error
        waiter: asyncio.Future[ResponseHead] = self._loop.create_future()
        self._head_waiter = waiter
        timer = None
        if timeout is not None:
            reason = f"no response from {self.endpoint} within {timeout:g}s"

            def expire() -> None:
                if not waiter.done():
                    waiter.set_exception(UpstreamTimeout(reason))

            timer = self._loop.call_later(timeout, expire)
        try:
            return await waiter
        finally:
            self._head_waiter = None
            if timer is not None:
                timer.cancel()

    async def read_body(self) -> bytes | None:
        while True:
            if self._chunks:
                data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
                self._chunks.clear()
                self.connection.consumed(self.stream_id, len(data))
                return data
            if self._message_done:
                return None
            if self._error is not None:
                raise self._error
            self._body_waiter = self._loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None

    @property
    def response_trailers(self) -> HeaderMap | None:
        return self._trailers

    @property
    def buffered(self) -> int:
        """Response body received and not read yet (at most one stream window)."""
        return sum(len(chunk) for chunk in self._chunks)

    def response_complete_after_buffered(self) -> bool:
        return self._message_done

    @property
    def response_complete(self) -> bool:
        return self._message_done and not self._chunks

    # -- lifecycle (the lease) -------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._error is not None or self.connection.closed

    @property
    def reusable(self) -> bool:
        """The connection can carry further exchanges (this one is finished)."""
        return self.connection.usable and self._message_done and self._request_done

    def close(self) -> None:
        """Abandon this exchange: reset the stream if it is still open (the connection stays)."""
        if not (self._message_done and self._request_done):
            self.connection.reset(self.stream_id)
        self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.connection.release(self)

    # -- driven by the connection ----------------------------------------------------------------
    def _check_alive(self, during: str) -> None:
        if self._error is not None:
            raise UpstreamReset(f"upstream {self.endpoint} stream reset {during}: {self._error}")

    def _on_head(self, head: ResponseHead, ended: bool) -> None:
        self._head = head
        if ended:
            self._message_done = True
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_result(head)

    def _on_data(self, data: bytes, ended: bool) -> None:
        if data:
            self._chunks.append(data)
        if ended:
            self._message_done = True
        self._wake(self._body_waiter)

    def _on_trailers(self, trailers: HeaderMap) -> None:
        self._trailers = trailers
        self._message_done = True
        self._wake(self._body_waiter)

    def _on_window(self) -> None:
        self._wake(self._window_waiter)

    def _fail(self, error: UpstreamReset) -> None:
        if self._message_done and self._request_done:
            return
        self._error = error
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(error)
        self._wake(self._body_waiter)
        self._wake(self._window_waiter)

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 client connection; many concurrent exchanges."""

    def __init__(self, endpoint: str, scheme: str) -> None:
        self.endpoint = endpoint
        self.scheme = scheme
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.requests = 0
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self._exchanges: dict[int, H2UpstreamExchange] = {}
        self._leased = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._going_away = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.ready = self.loop.create_future()
        """Resolves once the server's SETTINGS arrived (so its stream limit is known)."""

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self._conn.initiate_connection()
        self._conn.increment_flow_control_window(CONNECTION_WINDOW - self._conn.inbound_flow_control_window)
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._flush()
            self._shutdown(f"upstream {self.endpoint} broke the HTTP/2 protocol: {exc}")
            return
        for event in events:
            self._on_event(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._shutdown(f"upstream {self.endpoint} closed the connection" + (f": {exc}" if exc else ""))

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- events ----------------------------------------------------------------------------------
    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(None)
            self._wake_slots()
            return
        if isinstance(event, h2.events.ConnectionTerminated):
            self._going_away = True
            last = event.last_stream_id or 0
            for open_sid, open_exchange in list(self._exchanges.items()):
                if open_sid > last:
                    # Never processed (RFC 9113 6.8): safe to send again elsewhere.
                    open_exchange._fail(UpstreamReset(f"upstream {self.endpoint} went away", before_response=True))
            self._wake_slots()
            return
        sid: int = getattr(event, "stream_id", None) or 0
        if isinstance(event, h2.events.WindowUpdated):
            # Stream 0: the connection window grew, which may unblock any stream.
            if not sid:
                targets = list(self._exchanges.values())
            else:
                targets = [self._exchanges[sid]] if sid in self._exchanges else []
            for target in targets:
                target._on_window()
            return
        exchange = self._exchanges.get(sid)
        if exchange is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            headers = HeaderMap((_text(k), _text(v)) for k, v in event.headers or ())
            status = int(headers.get(":status") or 0)
            exchange._on_head(ResponseHead(status, headers, True, False), event.stream_ended is not None)
        elif isinstance(event, h2.events.DataReceived):
            data = bytes(event.data or b"")
            padding = (event.flow_controlled_length or 0) - len(data)
            if padding > 0:
                self.consumed(event.stream_id or 0, padding)
            exchange._on_data(data, event.stream_ended is not None)
        elif isinstance(event, h2.events.TrailersReceived):
            exchange._on_trailers(HeaderMap((_text(k), _text(v)) for k, v in event.headers or ()))
        elif isinstance(event, h2.events.StreamReset):
            code = int(event.error_code or 0)
            exchange._fail(
                UpstreamReset(
                    f"upstream {self.endpoint} reset the stream (error code {code})",
                    before_response=code in _RETRYABLE_CODES,
                )
            )

    # -- used by exchanges -----------------------------------------------------------------------
    def start(
        self,
        exchange: H2UpstreamExchange,
        method: str,
        target: str,
        fields: list[tuple[str, str]],
        *,
        body: bool,
        content_length: int | None,
    ) -> None:
        if not self.usable:
            raise UpstreamReset(f"upstream {self.endpoint} connection is closed", before_response=True)
        headers = request_headers(method, self.scheme, target, fields, content_length if body else None)
        try:
            sid = self._conn.get_next_available_stream_id()
            self._conn.send_headers(sid, headers, end_stream=not body)
        except h2.exceptions.ProtocolError as exc:
            # Too many open streams (one whose response ended but whose request did not), or
            # the connection is past its GOAWAY: nothing was sent.
            reason = f"upstream {self.endpoint}: cannot open a stream: {exc}"
            raise UpstreamReset(reason, before_response=True) from None
        exchange.stream_id = sid
        self._exchanges[sid] = exchange
        self.requests += 1
        self._flush()

    def send_window(self, stream_id: int) -> int:
        try:
            return min(self._conn.local_flow_control_window(stream_id), self._conn.max_outbound_frame_size)
        except h2.exceptions.StreamClosedError:
            raise UpstreamReset(f"upstream {self.endpoint} closed the stream while the body was sent") from None

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self._conn.send_data(stream_id, data, end_stream=end_stream)
        self._flush()

    def end_stream(self, stream_id: int, trailers: list[tuple[str, str]] | None) -> None:
        try:
            if trailers:
                self._conn.send_headers(stream_id, trailers, end_stream=True)
            else:
                self._conn.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            return
        self._flush()

    def consumed(self, stream_id: int, nbytes: int) -> None:
        if nbytes <= 0 or self._closed:
            return
        try:
            self._conn.acknowledge_received_data(nbytes, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self._flush()

    def reset(self, stream_id: int) -> None:
        if self._closed or not stream_id:
            return
        try:
            self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self._flush()

    async def drain(self) -> None:
        if self._write_paused and not self._closed:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- leases ----------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def usable(self) -> bool:
        """Open, not told to go away, stream ids left."""
        return not self._closed and not self._going_away and self._conn.highest_outbound_stream_id < 2**31 - 1000

    def has_slot(self) -> bool:
        limit = self._conn.remote_settings.max_concurrent_streams
        return self._leased < limit

    async def exchange(self, timeout: float) -> H2UpstreamExchange:
        """Lease a stream; waits (up to `timeout`) while the server's stream limit is reached."""
        deadline = self.loop.time() + timeout
        while not self.has_slot():
            if not self.usable:
                raise UpstreamReset(f"upstream {self.endpoint} connection is closed", before_response=True)
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - self.loop.time()))
            except TimeoutError:
                raise ConnectFailed(f"upstream {self.endpoint}: no free HTTP/2 stream within {timeout:g}s") from None
        if not self.usable:
            raise UpstreamReset(f"upstream {self.endpoint} connection is closed", before_response=True)
        self._leased += 1
        return H2UpstreamExchange(self)

    def release(self, exchange: H2UpstreamExchange) -> None:
        self._leased -= 1
        self._exchanges.pop(exchange.stream_id, None)
        self._wake_slots()
        if self._going_away and not self._exchanges:
            self.close()

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
        for exchange in list(self._exchanges.values()):
            exchange._fail(UpstreamReset(reason, before_response=exchange._head is None and not exchange._chunks))
        if not self.ready.done():
            self.ready.set_exception(ConnectFailed(reason))
            self.ready.exception()  # retrieved: nobody may be waiting
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._slot_waiters.clear()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        if not self._closed:
            try:
                self._conn.close_connection()
                self._flush()
            except h2.exceptions.ProtocolError:
                pass
        self._shutdown(f"upstream {self.endpoint} connection closed")


async def open_h2_connection(
    host: str,
    port: int,
    timeout: float,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> H2UpstreamConnection:
    """Connect (TLS with ALPN h2, or prior-knowledge h2c without `ssl_context`) and wait for the
    server's SETTINGS. Raises ConnectFailed."""
    loop = asyncio.get_running_loop()
    endpoint = format_host_port(host, port)
    scheme = "https" if ssl_context is not None else "http"
    try:
        transport, protocol = await asyncio.wait_for(
            loop.create_connection(
                lambda: H2UpstreamConnection(endpoint, scheme),
                host,
                port,
                ssl=ssl_context,
                server_hostname=(server_hostname or host) if ssl_context is not None else None,
            ),
            timeout,
        )
    except TimeoutError:
        raise ConnectFailed(f"connect to {endpoint} timed out after {timeout:g}s") from None
    except ssl.SSLError as exc:
        raise ConnectFailed(f"TLS handshake with {endpoint} failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise ConnectFailed(f"connect to {endpoint} failed: {exc.strerror or exc}") from None
    if ssl_context is not None:
        ssl_obj = transport.get_extra_info("ssl_object")
        alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
        if alpn != "h2":
            transport.close()
            raise ConnectFailed(f"upstream {endpoint} did not agree to HTTP/2 (ALPN: {alpn or 'none'})")
    try:
        await asyncio.wait_for(asyncio.shield(protocol.ready), timeout)
    except TimeoutError:
        protocol.close()
        raise ConnectFailed(f"upstream {endpoint} sent no HTTP/2 SETTINGS within {timeout:g}s") from None
    return protocol


class H2Endpoint:
    """The one multiplexed connection to an endpoint, made on first use and remade when it dies."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 2.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.connects = 0
        self._conn: H2UpstreamConnection | None = None
        self._connecting: asyncio.Future[H2UpstreamConnection] | None = None

    async def connection(self) -> H2UpstreamConnection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        if self._connecting is None:
            # Concurrent first requests share one connect instead of racing several.
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _connect(self) -> H2UpstreamConnection:
        self.connects += 1
        conn = await open_h2_connection(
            self.host,
            self.port,
            self.connect_timeout,
            ssl_context=self.ssl_context,
            server_hostname=self.server_hostname,
        )
        self._conn = conn
        return conn

    async def exchange(self) -> H2UpstreamExchange:
        """A stream for one request; `close()` or `release()` it when done."""
        conn = await self.connection()
        return await conn.exchange(self.connect_timeout)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
