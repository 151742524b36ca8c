"""HTTP/2 test servers on the downstream codec and on grpcio, and a raw HTTP/2 client for hostile traffic."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
import struct
from collections.abc import AsyncIterator
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import Frame

from sluice.proxy.http2.events import H2Counters, H2Limits
from sluice.proxy.http2.protocol import H2DownstreamProtocol, H2Stream, Handler

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_body(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


class EchoRecorder:
    """A handler: `/download/N` streams N bytes; anything else answers with what it received.

    `slow_read_s` waits before reading the request body, so the client has time to fill every
    window it was given; `max_buffered` and `max_pending_send` record what the server held.
    """

    def __init__(self, slow_read_s: float = 0.0) -> None:
        self.slow_read_s = slow_read_s
        self.max_buffered = 0
        self.max_pending_send = 0
        self.streams = 0

    async def __call__(self, stream: H2Stream) -> None:
        self.streams += 1
        headers = dict(stream.headers)
        path = headers[":path"]
        if self.slow_read_s:
            await asyncio.sleep(self.slow_read_s)
        body = bytearray()
        while True:
            self.max_buffered = max(self.max_buffered, stream.buffered)
            chunk = await stream.read_body()
            if chunk is None:
                break
            body += chunk
        if path.startswith("/download/"):
            size = int(path.rsplit("/", 1)[1])
            stream.send_response([(":status", "200"), ("content-type", "application/octet-stream")])
            sent = 0
            while sent < size:
                piece = PATTERN[: min(len(PATTERN), size - sent)]
                sent += len(piece)
                await stream.send_data(piece, end_stream=sent >= size)
                self.max_pending_send = max(self.max_pending_send, stream.pending_send())
            return
        answer = json.dumps(
            {
                "headers": list(stream.headers),
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "trailers": list(stream.trailers or ()),
                "tls_version": _tls_version(stream),
            }
        ).encode()
        stream.send_response(
            [(":status", "200"), ("content-type", "application/json"), ("connection", "keep-alive")]
        )
        if stream.trailers:
            await stream.send_data(answer)
            stream.send_trailers([("x-echo-" + k, v) for k, v in stream.trailers])
        else:
            await stream.send_data(answer, end_stream=True)


def _tls_version(stream: H2Stream) -> str | None:
    transport = stream.connection.transport
    ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
    return ssl_obj.version() if ssl_obj is not None else None


@contextlib.asynccontextmanager
async def h2_server(
    handler: Handler,
    *,
    ssl_context: ssl.SSLContext | None = None,
    limits: H2Limits | None = None,
    counters: H2Counters | None = None,
) -> AsyncIterator[tuple[int, list[H2DownstreamProtocol]]]:
    loop = asyncio.get_running_loop()
    made: list[H2DownstreamProtocol] = []

    def factory() -> H2DownstreamProtocol:
        proto = H2DownstreamProtocol(handler, limits, counters)
        made.append(proto)
        return proto

    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=ssl_context)
    sockets = server.sockets
    assert sockets
    try:
        yield sockets[0].getsockname()[1], made
    finally:
        server.close()
        for proto in made:
            if proto.transport is not None:
                proto.transport.close()
        await server.wait_closed()


class RawClient:
    """A client-side h2 connection on a real socket, for traffic a polite client never sends."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, initial_window: int | None = None
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        if initial_window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window})
        self.events: list[h2.events.Event] = []
        self.flush()

    @classmethod
    async def connect(cls, port: int, initial_window: int | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, initial_window)

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def send_frames(self, frames: list[Frame]) -> None:
        self.writer.write(b"".join(f.serialize() for f in frames))

    async def pump(self, timeout: float = 5.0) -> bool:
        """Read once; False at EOF."""
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        if not data:
            return False
        try:
            self.events.extend(self.conn.receive_data(data))
        except h2.exceptions.ProtocolError:
            return False
        self.flush()
        return True

    async def until_goaway(self, timeout: float = 10.0) -> h2.events.ConnectionTerminated | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for event in self.events:
                if isinstance(event, h2.events.ConnectionTerminated):
                    return event
            try:
                if not await self.pump(deadline - loop.time()):
                    break
            except (ConnectionResetError, TimeoutError):
                break
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    async def drained(self) -> None:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


# -- gRPC ----------------------------------------------------------------------------------------


def grpc_frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def start_grpc_server() -> tuple[grpc.Server, int]:
    """A grpcio server on 127.0.0.1 with `/test.Echo/Say` (bytes in, `echo:` + bytes out, a
    trailer `x-upstream-trailer: t1`; the message `missing` fails NOT_FOUND)."""

    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        context.set_trailing_metadata((("x-upstream-trailer", "t1"),))
        return b"echo:" + request

    rpc = grpc.unary_unary_rpc_method_handler(say)  # no serializers: bytes in, bytes out
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Say": rpc}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class H2Response:
    """One stream's answer as `H2Client` collected it."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.trailers: dict[str, str] = {}
        self.reset: int | None = None
        """The error code of a RST_STREAM the server sent, if it did."""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def json(self) -> dict[str, object]:
        data = json.loads(bytes(self.body))
        assert isinstance(data, dict)
        return data


class H2Client:
    """A polite HTTP/2 client (h2 on a real socket, TLS with ALPN h2 or h2c): several streams at
    once, request bodies sent as the server's windows allow, trailers both ways.

    `window` is the stream window it advertises; `ack_delay_s` waits before each read is
    acknowledged, so the server has to keep to the windows for a whole response to arrive."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, scheme: str,
        window: int | None, ack_delay_s: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.scheme = scheme
        self.ack_delay_s = ack_delay_s
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.responses: dict[int, H2Response] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.settings_seen = asyncio.get_running_loop().create_future()
        self._windows = asyncio.Event()
        self.writer.write(self.conn.data_to_send())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(
        cls, port: int, ctx: ssl.SSLContext | None = None, *, window: int | None = None, ack_delay_s: float = 0.0
    ) -> H2Client:
        if ctx is not None:
            ctx.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx is not None else None
        )
        if ctx is not None:
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        return cls(reader, writer, "https" if ctx is not None else "http", window, ack_delay_s)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for event in self.conn.receive_data(data):
                    await self._event(event)
                self.writer.write(self.conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            for response in self.responses.values():
                if not response.done.done():
                    response.done.set_exception(ConnectionError("connection closed"))
            self._windows.set()

    async def _event(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        response = self.responses.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and response is not None:
            headers = dict(event.headers)
            response.status = int(headers.pop(":status"))
            response.headers = headers
        elif isinstance(event, h2.events.DataReceived):
            if response is not None:
                response.body += event.data
            if self.ack_delay_s:
                await asyncio.sleep(self.ack_delay_s)
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and response is not None:
            response.trailers = dict(event.headers)
        elif isinstance(event, h2.events.StreamEnded) and response is not None:
            if not response.done.done():
                response.done.set_result(None)
        elif isinstance(event, h2.events.StreamReset) and response is not None:
            response.reset = int(event.error_code)
            if not response.done.done():
                response.done.set_result(None)
        elif isinstance(event, h2.events.WindowUpdated):
            self._windows.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.settings_seen.done():
                self.settings_seen.set_result(None)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event

    async def start(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        trailers: list[tuple[str, str]] | None = None,
        authority: str = "localhost",
    ) -> H2Response:
        """Open a stream and send the whole request; the response completes `done`."""
        sid = self.conn.get_next_available_stream_id()
        response = self.responses[sid] = H2Response()
        head = [(":method", method), (":path", path), (":authority", authority), (":scheme", self.scheme)]
        ends = not body and trailers is None
        self.conn.send_headers(sid, head + (headers or []), end_stream=ends)
        self.writer.write(self.conn.data_to_send())
        sent = 0
        while sent < len(body):
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self._windows.clear()
                await asyncio.wait_for(self._windows.wait(), 10)
                continue
            piece = body[sent : sent + window]
            sent += len(piece)
            self.conn.send_data(sid, piece, end_stream=sent == len(body) and trailers is None)
            self.writer.write(self.conn.data_to_send())
            await self.writer.drain()
        if trailers is not None:
            self.conn.send_headers(sid, trailers, end_stream=True)
            self.writer.write(self.conn.data_to_send())
        return response

    async def request(self, method: str, path: str, **kwargs: object) -> H2Response:
        response = await self.start(method, path, **kwargs)  # type: ignore[arg-type]
        await asyncio.wait_for(response.done, 20)
        return response

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close_connection()
            self.writer.write(self.conn.data_to_send())
        self.writer.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
