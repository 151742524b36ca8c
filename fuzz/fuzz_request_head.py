#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris) of the request parsing path: arbitrary bytes, cut into
arbitrary reads, into a `DownstreamConnection` over an in-process transport. The exchange behind
it is a stand-in that answers at once, when the request ends, or by tunnelling an upgrade, as the
input decides; timers fire for real (header and body timeouts set tiny).

Findings: an exception out of `data_received` or a timer, anything the event loop's exception
handler sees, or bytes written that are not an HTTP/1.1 response.

    python fuzz/fuzz_request_head.py -max_total_time=60 [corpus_dir]

The seed corpus is a handful of valid, pipelined, chunked and upgrade requests; `make fuzz` runs
every target for a bounded time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import atheris
from harness import fuzz

with atheris.instrument_imports(include=["sluice"]):
    from sluice.abi import HeaderMap
    from sluice.proxy.downstream import ClientLimits, DownstreamConnection, RequestHead
    from sluice.proxy.rejections import Rejection
    from sluice.proxy.stats import ProxyStats

SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /n HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x00",
    b"POST /h HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade\r\nContent-Length: 2\r\n\r\n"
    b"okGET / HTTP/1.1\r\n\r\n",
    b"GET http://x.example/a?b HTTP/1.0\r\nExpect: 100-continue\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
]

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


class Transport:
    """What the connection uses of an asyncio transport; keeps what is written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.written.append(data)

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4242) if name in ("peername", "sockname") else default


class Tunnel:
    def client_data(self, data: bytes) -> None:
        assert isinstance(data, bytes)

    def client_eof(self) -> None: ...

    def client_writable(self) -> None: ...

    def client_lost(self) -> None: ...


class Exchange:
    """The request handler: checks what it is handed and answers as the input chose."""

    def __init__(self, client: DownstreamConnection, head: RequestHead, mode: int) -> None:
        assert isinstance(head.method, str) and isinstance(head.target, str) and head.version in ("1.0", "1.1")
        assert all(isinstance(k, str) and isinstance(v, str) and k == k.lower() for k, v in head.fields)
        self.client = client
        self.head = head
        self.mode = mode
        self.done = False

    def start(self, body: bytes, complete: bool, trailers: HeaderMap | None) -> None:
        if self.head.upgrade and self.mode == 2:
            self.client.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            self.done = True
            self.client.start_tunnel(Tunnel())
            return
        self.request_body(body, complete, trailers)

    def request_body(self, body: bytes, complete: bool, trailers: HeaderMap | None) -> None:
        assert isinstance(body, bytes) and not self.done
        if self.mode == 0 or complete:
            self._answer()

    def _answer(self) -> None:
        if not self.done:
            self.done = True
            self.client.write(OK)
            self.client.exchange_done(self, True)

    def client_writable(self) -> None: ...

    def client_gone(self) -> None:
        self.done = True

    def client_error(self, reason: str) -> None:
        assert isinstance(reason, str)
        self._answer()

    def client_timeout(self, rejection: Rejection) -> None:
        assert isinstance(rejection, Rejection)
        self._answer()


class Owner:
    def __init__(self, limits: ClientLimits, mode: int) -> None:
        self.stats = ProxyStats()
        self.connections: set[DownstreamConnection] = set()
        self._limits = limits
        self.mode = mode

    def limits(self) -> ClientLimits:
        return self._limits

    def begin(self, client: DownstreamConnection, head: RequestHead) -> Exchange:
        return Exchange(client, head, self.mode)

    def connection_closed(self, client: DownstreamConnection) -> None:
        self.connections.discard(client)


LOOP = asyncio.new_event_loop()
ERRORS: list[dict[str, Any]] = []
LOOP.set_exception_handler(lambda loop, context: ERRORS.append(context))


async def one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    timers = fdp.ConsumeBool()
    header_size = fdp.ConsumeIntInRange(64, 4096)
    limits = ClientLimits(header_size, 0.0005 if timers else 30.0, 0.0005 if timers else 30.0, None)
    owner = Owner(limits, mode)
    conn = DownstreamConnection(owner)  # type: ignore[arg-type]  # the stand-ins, not the real server
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    cuts = sorted({b % (len(rest) + 1) for b in rest[:4]}) if rest else []
    start = 0
    for cut in [*cuts, len(rest)]:
        if transport.closing:
            break
        if cut > start:
            conn.data_received(rest[start:cut])
            start = cut
    if timers and not transport.closing:
        await asyncio.sleep(0.002)  # let the header/body timers fire
    if not transport.closing:
        conn.eof_received()
    conn.connection_lost(None)
    for chunk in transport.written:
        if not chunk.startswith(b"HTTP/1.1 "):
            raise AssertionError(f"wrote something that is not a response: {chunk[:80]!r}")
    if ERRORS:
        raise AssertionError(f"the event loop saw an error: {ERRORS[0]}")


def test_one(data: bytes) -> None:
    LOOP.run_until_complete(one(data))


def main() -> None:
    # The first bytes choose the mode, the timers and the header limit (see `one`).
    seeds = {f"seed{index}": b"\x00\x00\x10\x00" + seed for index, seed in enumerate(SEEDS)}
    fuzz(test_one, seeds, "sluice-fuzz-head-")


if __name__ == "__main__":
    main()
