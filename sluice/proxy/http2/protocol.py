"""An asyncio driver for `H2ServerConnection`: one task per stream, awaitable reads and writes.

`H2DownstreamProtocol` is what a listener hands a connection to once ALPN said `h2` (or the
client sent the prior-knowledge preface). Each request becomes an `H2Stream` passed to the
handler coroutine; the handler reads the body (`read_body`, which is what reopens the client's
window), and answers with `send_response` / `send_data` / `send_trailers`.

Backpressure towards the socket: while the transport's write buffer is full the protocol stops
reading, so a client that does not read cannot make us queue SETTINGS/PING acknowledgements or
responses without bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import cast

import h2.errors

from .downstream import H2ServerConnection
from .events import (
    ConnectionEnded,
    Fields,
    H2Counters,
    H2Event,
    H2Limits,
    RequestData,
    RequestHeaders,
    RequestTrailers,
    StreamReset,
    StreamWritable,
)


class StreamAborted(Exception):
    """The client reset the stream or the connection ended."""


class H2Stream:
    """One request/response exchange on an HTTP/2 connection."""

    def __init__(self, protocol: H2DownstreamProtocol, stream_id: int, headers: Fields, end_stream: bool) -> None:
        self._protocol = protocol
        self.stream_id = stream_id
        self.headers = headers
        self.trailers: Fields | None = None
        """The request's trailers, once `read_body` returned None."""
        self._chunks: collections.deque[bytes] = collections.deque()
        self._ended = end_stream
        self._aborted: StreamAborted | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self.buffered = 0
        """Request body received and not read yet (bounded by the stream window)."""

    @property
    def connection(self) -> H2DownstreamProtocol:
        """The connection (its `transport` has the peer address and the TLS `ssl_object`)."""
        return self._protocol

    # -- request ---------------------------------------------------------------------------------
    async def read_body(self) -> bytes | None:
        """The next piece of request body; None at its end. Raises StreamAborted."""
        while True:
            if self._chunks:
                data = self._chunks.popleft()
                self.buffered -= len(data)
                self._protocol.consumed(self.stream_id, len(data))
                return data
            if self._aborted is not None:
                raise self._aborted
            if self._ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    # -- response --------------------------------------------------------------------------------
    def send_response(self, headers: Iterable[tuple[str, str]], end_stream: bool = False) -> None:
        self._check()
        self._protocol.codec.send_response(self.stream_id, headers, end_stream)
        self._protocol.flush()

    async def send_data(self, data: bytes, end_stream: bool = False) -> None:
        """Queue body; waits while the client's window keeps too much of it unsent."""
        self._check()
        codec = self._protocol.codec
        codec.send_data(self.stream_id, data, end_stream)
        self._protocol.flush()
        while codec.send_blocked(self.stream_id) or self._protocol.write_paused:
            self._check()
            await self._protocol.wait_writable(self)

    def send_trailers(self, trailers: Iterable[tuple[str, str]]) -> None:
        self._check()
        self._protocol.codec.send_trailers(self.stream_id, trailers)
        self._protocol.flush()

    def reset(self, error_code: int = h2.errors.ErrorCodes.INTERNAL_ERROR) -> None:
        self._protocol.codec.reset(self.stream_id, error_code)
        self._protocol.flush()

    def pending_send(self) -> int:
        """Response body queued in the codec, waiting for the client's window."""
        return self._protocol.codec.pending_bytes(self.stream_id)

    # -- driven by the protocol ------------------------------------------------------------------
    def _check(self) -> None:
        if self._aborted is not None:
            raise self._aborted

    def _push(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.append(data)
            self.buffered += len(data)
        self._ended = self._ended or end
        self._wake()

    def _abort(self, reason: str) -> None:
        if self._aborted is None:
            self._aborted = StreamAborted(reason)
        self._wake()
        self._wake_writer()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)


Handler = Callable[[H2Stream], Awaitable[None]]


class H2DownstreamProtocol(asyncio.Protocol):
    def __init__(self, handler: Handler, limits: H2Limits | None = None, counters: H2Counters | None = None) -> None:
        self.codec = H2ServerConnection(limits, counters)
        self._handler = handler
        self.transport: asyncio.Transport | None = None
        self._streams: dict[int, H2Stream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.write_paused = False
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self.ended: ConnectionEnded | None = None
        self.closed = self._loop.create_future()
        """Resolves when the connection is gone (tests and shutdown wait on it)."""

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.codec.initiate()
        self.flush()

    def data_received(self, data: bytes) -> None:
        self._dispatch(self.codec.receive(data))
        self.flush()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        for stream in self._streams.values():
            stream._abort("connection lost")
        self._streams.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        for stream in self._streams.values():
            stream._wake_writer()

    # -- glue ------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what the codec has queued, once per loop iteration.

        Every stream's response and every WINDOW_UPDATE of one iteration go out in one write:
        on TLS each write is a record and a syscall, which cost more than the HTTP/2 framing.
        """
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._flush_scheduled = False
        data = self.codec.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
        if self.ended is None and self.codec.ended is not None:
            # Ended by a call rather than by received bytes (a drain that just finished).
            self._dispatch([self.codec.ended])
        if self.ended is not None and transport is not None:
            transport.close()

    def consumed(self, stream_id: int, nbytes: int) -> None:
        self.codec.consumed(stream_id, nbytes)
        self.flush()

    async def wait_writable(self, stream: H2Stream) -> None:
        stream._writable = asyncio.get_running_loop().create_future()
        try:
            await stream._writable
        finally:
            stream._writable = None

    def _dispatch(self, events: list[H2Event]) -> None:
        for event in events:
            if isinstance(event, RequestHeaders):
                stream = H2Stream(self, event.stream_id, event.headers, event.end_stream)
                self._streams[event.stream_id] = stream
                task = asyncio.get_running_loop().create_task(self._run(stream))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(event, RequestData):
                found = self._streams.get(event.stream_id)
                if found is not None:
                    found._push(event.data, event.end_stream)
                else:
                    self.codec.consumed(event.stream_id, len(event.data))
            elif isinstance(event, RequestTrailers):
                found = self._streams.get(event.stream_id)
                if found is not None:
                    found.trailers = event.trailers
                    found._push(b"", True)
            elif isinstance(event, StreamReset):
                gone = self._streams.pop(event.stream_id, None)
                if gone is not None:
                    gone._abort(f"stream reset (error code {event.error_code})")
                    self._discard_unread(gone)
            elif isinstance(event, StreamWritable):
                found = self._streams.get(event.stream_id)
                if found is not None:
                    found._wake_writer()
            elif isinstance(event, ConnectionEnded):
                self.ended = event
                for stream in self._streams.values():
                    stream._abort(f"connection ended: {event.reason.value}")
                self._streams.clear()

    async def _run(self, stream: H2Stream) -> None:
        try:
            await self._handler(stream)
        except StreamAborted:
            pass
        except Exception:
            # A failing handler costs its own stream only.
            with contextlib.suppress(StreamAborted):
                stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            self._streams.pop(stream.stream_id, None)
            self._discard_unread(stream)
            self.flush()

    def _discard_unread(self, stream: H2Stream) -> None:
        """Body nobody will read still holds its share of the connection window: give it back."""
        if stream.buffered:
            self.codec.consumed(stream.stream_id, stream.buffered)
            stream._chunks.clear()
            stream.buffered = 0

    def shutdown(self) -> None:
        """Graceful: GOAWAY now, close once the open streams have finished."""
        self.codec.goaway()
        self.flush()

    def close(self) -> None:
        """At once: GOAWAY and close; open streams are abandoned."""
        self.codec.goaway()
        self._write_out()
        if self.transport is not None:
            self.transport.close()
