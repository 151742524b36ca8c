"""Accept TCP, run the TLS handshake, hand the connection over; count the handshakes that fail.

`loop.create_server(ssl=...)` runs the handshake out of sight: a client offering only TLS 1.0, a
client certificate from another CA, plain HTTP sent to the TLS port all end in a debug-level log
line and nothing else. Running the handshake here with `loop.start_tls` turns each into a
counter by reason, while the listener goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from typing import cast

from .server import ServerTls

DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0


class HandshakeStats:
    """Per listener. Mutable on purpose: every connection of the listener adds to one object."""

    def __init__(self) -> None:
        self.completed = 0
        self.failed: collections.Counter[str] = collections.Counter()
        """By reason: OpenSSL's (`UNSUPPORTED_PROTOCOL`, `CERTIFICATE_VERIFY_FAILED`,
        `PEER_DID_NOT_RETURN_A_CERTIFICATE`, `HTTP_REQUEST`, ...), or `timeout`, `closed`."""


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or type(exc).__name__)
    if isinstance(exc, TimeoutError | ConnectionAbortedError):
        # asyncio and uvloop abort a handshake that outlives ssl_handshake_timeout with
        # ConnectionAbortedError; nothing else aborts a transport before it is handed over.
        return "timeout"
    if isinstance(exc, ConnectionError | EOFError):
        return "closed"
    return type(exc).__name__


class TlsAcceptor(asyncio.Protocol):
    """What a TLS listener's protocol factory returns (create the server *without* `ssl=`)."""

    def __init__(
        self,
        tls: ServerTls,
        app_factory: Callable[[], asyncio.Protocol],
        stats: HandshakeStats,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
    ) -> None:
        self._tls = tls
        self._app_factory = app_factory
        self._stats = stats
        self._timeout = handshake_timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        # The application protocol only comes in once the handshake is done; until then a holder
        # keeps what arrives: the SSL protocol may pass on the first request (sent right behind
        # the client's Finished) before start_tls returns, and the application must see
        # connection_made before any data.
        app = _Holder()
        # start_tls must take the socket over before this method returns: uvloop starts reading
        # right after connection_made (undoing any pause_reading here), and a ClientHello that
        # arrived before the takeover would reach this object and be lost. So the coroutine is
        # stepped by hand up to its one suspension point, which comes after the takeover (the
        # SSL protocol buffers what it receives before its own connection_made).
        coro = loop.start_tls(raw, app, self._tls.context, server_side=True, ssl_handshake_timeout=self._timeout)
        try:
            waiter = coro.send(None)
        except StopIteration as done:  # pragma: no cover - start_tls always waits for the handshake
            self._handed_over(app, done.value)
            return
        except (OSError, TimeoutError, EOFError) as exc:  # pragma: no cover - fails before any I/O
            self._failed(raw, exc)
            return

        def resume(_: object) -> None:
            try:
                coro.send(None)  # the waiter is done: start_tls returns or raises
            except StopIteration as done:
                self._handed_over(app, done.value)
            except (OSError, TimeoutError, EOFError) as exc:
                self._failed(raw, exc)

        cast("asyncio.Future[None]", waiter).add_done_callback(resume)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - start_tls owns the socket
        raise AssertionError("data before the TLS handshake")

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def _handed_over(self, holder: _Holder, secure: asyncio.Transport | None) -> None:
        if secure is None:  # the transport was closed under us
            self._stats.failed["closed"] += 1
            return
        self._stats.completed += 1
        app = self._app_factory()
        secure.set_protocol(app)
        app.connection_made(secure)
        holder.replay(app, secure)

    def _failed(self, raw: asyncio.Transport, exc: BaseException) -> None:
        self._stats.failed[failure_reason(exc)] += 1
        raw.close()


class _Holder(asyncio.Protocol):
    """The secure transport's protocol from the handshake until the application takes over."""

    def __init__(self) -> None:
        self._data: list[bytes] = []
        self._eof = False
        self._lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self._data.append(data)

    def eof_received(self) -> bool | None:
        self._eof = True
        return True  # the application decides once it has the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = (exc,)

    def replay(self, app: asyncio.Protocol, secure: asyncio.Transport) -> None:
        for data in self._data:
            if secure.is_closing():
                break
            app.data_received(data)
        self._data = []
        if self._eof and not app.eof_received():
            secure.close()
        if self._lost is not None:
            app.connection_lost(self._lost[0])
