"""Which protocol a new downstream connection speaks, and handing it to that protocol's object.

On TLS the handshake already decided: ALPN `h2` or not. On a plain listener with h2c enabled the
first bytes decide: the HTTP/2 connection preface, or anything else (HTTP/1.1). Either way the
connection is handed over with `transport.set_protocol`, replaying what was read while deciding,
so neither protocol object knows there was a selector in front of it.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from typing import cast

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class WireProtocol(enum.Enum):
    HTTP1 = "http/1.1"
    H2 = "h2"


def negotiated(transport: asyncio.BaseTransport) -> WireProtocol | None:
    """The protocol ALPN chose on a TLS transport; None on a plain one."""
    ssl_obj = transport.get_extra_info("ssl_object")
    if ssl_obj is None:
        return None
    return WireProtocol.H2 if ssl_obj.selected_alpn_protocol() == "h2" else WireProtocol.HTTP1


ProtocolFactory = Callable[[], asyncio.Protocol]


class ProtocolSelector(asyncio.Protocol):
    """The listener's protocol factory returns one of these per connection."""

    def __init__(self, http1: ProtocolFactory, h2: ProtocolFactory, *, h2c: bool = False) -> None:
        self._http1 = http1
        self._h2 = h2
        self._h2c = h2c
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self.chosen: WireProtocol | None = None
        self._target: asyncio.Protocol | None = None
        """The chosen protocol's object: what still reaches the selector goes there (a TLS
        acceptor replays what arrived during the handshake to the object it handed over to)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        by_alpn = negotiated(transport)
        if by_alpn is not None:
            self._hand_over(by_alpn)
        elif not self._h2c:
            self._hand_over(WireProtocol.HTTP1)

    def data_received(self, data: bytes) -> None:
        if self._target is not None:
            self._target.data_received(data)
            return
        # Only reached on a plain h2c-enabled listener before the first bytes decided.
        self._buffer += data
        seen = self._buffer[: len(PREFACE)]
        if not PREFACE.startswith(seen):
            self._hand_over(WireProtocol.HTTP1)
        elif len(seen) == len(PREFACE):
            self._hand_over(WireProtocol.H2)

    def eof_received(self) -> bool | None:
        if self._target is not None:
            return self._target.eof_received()
        if self._buffer:
            # A client that sent part of a request and stopped: let HTTP/1.1 answer it.
            self._hand_over(WireProtocol.HTTP1)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._target is not None:
            self._target.connection_lost(exc)

    def _hand_over(self, protocol: WireProtocol) -> None:
        transport = self._transport
        if transport is None or self.chosen is not None:
            return
        self.chosen = protocol
        target = self._target = (self._h2 if protocol is WireProtocol.H2 else self._http1)()
        transport.set_protocol(target)
        target.connection_made(transport)
        data, self._buffer = self._buffer, b""
        if data and not transport.is_closing():
            target.data_received(data)
