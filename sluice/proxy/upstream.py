"""A lean HTTP/1.1 client connection for upstream traffic: asyncio protocol + httptools parser.

One `UpstreamConnection` carries one exchange at a time (no pipelining) and goes back to its
`ClusterPool` when the response ended cleanly and both sides allow keep-alive. Bodies stream in
both directions with flow control: `write_body` waits while the socket's buffer is full, and the
response side stops reading from the socket while unread body piles up.

After a `101 Switching Protocols` the connection becomes a byte tunnel (`read_raw`/`write_raw`).

Why not aiohttp's client: see bench/README.md (it was measured; this one is faster per request
because it does no URL handling, cookie jar, tracing or multidict header copies).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from typing import cast

import httptools

from sluice.abi import HeaderMap

READ_HIGH_WATER = 256 * 1024  # unread response body that pauses reading from the socket


class UpstreamError(Exception):
    """The exchange with the upstream failed."""


class ConnectFailed(UpstreamError):
    """No connection could be made (nothing was sent): 502."""


class UpstreamTimeout(UpstreamError):
    """No response headers within the cluster's timeout: 504."""


class UpstreamReset(UpstreamError):
    """The connection broke or the response was malformed."""

    def __init__(self, message: str, *, before_response: bool = False) -> None:
        super().__init__(message)
        self.before_response = before_response
        """Nothing of a response was received: a request without body may be retried."""


class _SkipBody(Exception):
    """Raised out of the parser for a response to HEAD: its Content-Length describes no body."""


class ResponseHead:
    __slots__ = ("status", "headers", "keep_alive", "upgrade")

    def __init__(self, status: int, headers: HeaderMap, keep_alive: bool, upgrade: bool) -> None:
        self.status = status
        self.headers = headers
        """`:status` first, then the fields as received (names lower-case)."""
        self.keep_alive = keep_alive
        self.upgrade = upgrade


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def encode_head(method: str, target: str, fields: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    lines.extend(f"{k}: {v}\r\n" for k, v in fields)
    lines.append("\r\n")
    return _enc("".join(lines))


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to one endpoint."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.requests = 0
        """Exchanges started on this connection (more than 1 = it was reused)."""
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._close_exc: BaseException | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        # Response state for the current exchange.
        self._parser = httptools.HttpResponseParser(self)
        self._head_method = False
        self._fields: list[tuple[str, str]] = []
        self._trailer_fields: list[tuple[str, str]] = []
        self._head: ResponseHead | None = None
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._message_done = False
        self._body_waiter: asyncio.Future[None] | None = None
        self._got_bytes = False
        self._tunnel = False
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
        self._close_exc = exc
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("upstream connection lost"))
        self._fail_waiters(exc)

    def eof_received(self) -> bool | None:
        # Closing is the right answer: we never half-close towards an HTTP/1.1 upstream except in
        # a tunnel, and there `read_raw` reports EOF.
        self._closed_by_peer()
        return None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._tunnel:
            self._push_chunk(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._start_tunnel(data[offset:])
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _SkipBody):
                self._on_message_complete_skip()
            else:
                reason = f"response from {self.endpoint} failed: {exc.__context__!r}"
                self._fail_waiters(UpstreamReset(reason))
                self.close()
        except httptools.HttpParserError as exc:
            self._fail_waiters(UpstreamReset(f"malformed response from {self.endpoint}: {exc}"))
            self.close()

    # -- httptools callbacks -------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head is None:
            self._fields.append((_dec(name).lower(), _dec(value)))
        else:
            self._trailer_fields.append((_dec(name).lower(), _dec(value)))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): the real one follows.
            self._fields = []
            return
        headers = HeaderMap([(":status", str(status))])
        for name, value in self._fields:
            headers.add(name, value)
        self._fields = []
        self._close_delimited = not (
            status in (204, 304) or self._head_method or "content-length" in headers or "transfer-encoding" in headers
        )
        head = ResponseHead(status, headers, self._parser.should_keep_alive(), status == 101)
        self._head = head
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(head)
        if self._head_method:
            raise _SkipBody()

    def on_body(self, body: bytes) -> None:
        self._push_chunk(body)

    def on_message_complete(self) -> None:
        if self._head is None:
            return  # end of an interim response
        self._message_done = True
        self._wake_body()

    def _on_message_complete_skip(self) -> None:
        self._message_done = True
        # The parser stopped mid-buffer: start the next exchange with a fresh one.
        self._parser = httptools.HttpResponseParser(self)
        self._wake_body()

    # -- response side -------------------------------------------------------------------------
    def _push_chunk(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake_body()

    def _wake_body(self) -> None:
        waiter, self._body_waiter = self._body_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _closed_by_peer(self) -> None:
        if self._tunnel:
            self._message_done = True
            self._wake_body()
            return
        if self._head is not None and not self._message_done and self._close_delimited:
            # A response without Content-Length or chunking ends when the connection does.
            self._message_done = True
            self._head.keep_alive = False
            self._wake_body()
            return
        self._fail_waiters(None)

    def _fail_waiters(self, exc: BaseException | None) -> None:
        head_waiter = self._head_waiter
        if head_waiter is not None and not head_waiter.done():
            reason = exc if isinstance(exc, UpstreamError) else None
            head_waiter.set_exception(
                reason
                or UpstreamReset(
                    f"upstream {self.endpoint} closed the connection before responding",
                    before_response=not self._got_bytes,
                )
            )
        body_waiter, self._body_waiter = self._body_waiter, None
        if body_waiter is not None and not body_waiter.done():
            body_waiter.set_result(None)

    async def read_head(self, timeout: float | None) -> ResponseHead:
        if self._head is not None:
            return self._head
        if self._closed:
            raise UpstreamReset(
                f"upstream {self.endpoint} closed the connection before responding",
                before_response=not self._got_bytes,
            )
        waiter: asyncio.Future[ResponseHead] = self._loop.create_future()
        self._head_waiter = waiter
        # A plain timer rather than asyncio.wait_for, which costs an extra future and callbacks
        # on every request.
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
        """The next piece of response body (or tunnel bytes); None at the end."""
        while True:
            if self._chunks:
                if len(self._chunks) == 1:
                    data = self._chunks.popleft()
                else:
                    data = b"".join(self._chunks)
                    self._chunks.clear()
                self._buffered = 0
                if self._read_paused and self.transport is not None and not self._closed:
                    self._read_paused = False
                    self.transport.resume_reading()
                return data
            if self._message_done:
                return None
            if self._closed:
                raise UpstreamReset(f"upstream {self.endpoint} closed the connection mid-response")
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._body_waiter = waiter
            await waiter

    @property
    def response_trailers(self) -> HeaderMap | None:
        return HeaderMap(self._trailer_fields) if self._trailer_fields else None

    def response_complete_after_buffered(self) -> bool:
        """The response has ended and what is left of it is already buffered here."""
        return self._message_done

    @property
    def response_complete(self) -> bool:
        return self._message_done and not self._chunks

    # -- request side --------------------------------------------------------------------------
    def start_request(
        self,
        method: str,
        target: str,
        fields: list[tuple[str, str]],
        *,
        body: bool,
        content_length: int | None,
    ) -> None:
        """Send the request head. Body framing: content_length if given, else chunked if `body`."""
        if self.transport is None or self._closed:
            raise UpstreamReset(f"upstream {self.endpoint} connection is closed", before_response=True)
        self.requests += 1
        self._head_method = method == "HEAD"
        self._chunked = body and content_length is None
        self._remaining = content_length if body else None
        if self._chunked:
            fields = [*fields, ("transfer-encoding", "chunked")]
        elif body and content_length is not None:
            fields = [*fields, ("content-length", str(content_length))]
        self._request_done = not body
        self.transport.write(encode_head(method, target, fields))

    async def write_body(self, data: bytes, end: bool) -> None:
        transport = self.transport
        if transport is None or self._closed:
            raise UpstreamReset(f"upstream {self.endpoint} connection lost while sending the body")
        if data:
            if self._chunked:
                transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
            else:
                if self._remaining is not None:
                    if len(data) > self._remaining:
                        raise UpstreamReset("request body longer than its content-length")
                    self._remaining -= len(data)
                transport.write(data)
        if end:
            self.end_request()
        if self._write_paused:
            await self._drain()

    def end_request(self, trailers: HeaderMap | None = None) -> None:
        if self._request_done or self.transport is None or self._closed:
            return
        self._request_done = True
        if self._chunked:
            tail = b"".join(_enc(f"{k}: {v}\r\n") for k, v in (trailers or ()) if not k.startswith(":"))
            self.transport.write(b"0\r\n" + tail + b"\r\n")
        elif self._remaining:
            # The client sent less than it announced; the upstream would wait forever.
            self.close()

    async def _drain(self) -> None:
        if not self._write_paused:
            return
        if self._closed:
            raise UpstreamReset(f"upstream {self.endpoint} connection lost while sending the body")
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiter = waiter
        await waiter

    # -- tunnel (after 101) --------------------------------------------------------------------
    def _start_tunnel(self, rest: bytes) -> None:
        self._tunnel = True
        self._message_done = False
        self._push_chunk(rest)

    async def read_raw(self) -> bytes | None:
        return await self.read_body()

    async def write_raw(self, data: bytes) -> None:
        if self.transport is None or self._closed:
            raise UpstreamReset("tunnel closed")
        self.transport.write(data)
        if self._write_paused:
            await self._drain()

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
            and not self._tunnel
            and head is not None
            and head.keep_alive
            and self._message_done
            and not self._chunks
            and self._request_done
        )

    def reset_for_next(self) -> None:
        self._head = None
        self._fields = []
        self._trailer_fields = []
        self._message_done = False
        self._got_bytes = False
        self._chunks.clear()
        self._buffered = 0
        self._request_done = False
        self._chunked = False
        self._remaining = None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._closed = True


async def open_connection(host: str, port: int, timeout: float) -> UpstreamConnection:
    loop = asyncio.get_running_loop()
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        _, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConnection(endpoint), host, port), timeout
        )
    except TimeoutError:
        raise ConnectFailed(f"connect to {endpoint} timed out after {timeout:g}s") from None
    except OSError as exc:
        raise ConnectFailed(f"connect to {endpoint} failed: {exc.strerror or exc}") from None
    return protocol
