"""The downstream HTTP/1.1 codec through real sockets: pipelining, trailers both ways, HTTP/1.0,
malformed requests, idle and draining connections, flow control both ways."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from conftest import proxy, run, upstream, wait_for
from test_proxy_http import config, split_response

from sluice.proxy import downstream, h1

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_upstream(handler: Handler) -> AsyncIterator[str]:
    """A plain asyncio server answering with whatever `handler` writes; yields "127.0.0.1:port"."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    fields = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    return lines[0], fields


async def read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Body and the raw trailer section of a chunked message."""
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            break
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    trailers = b""
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            return body, trailers
        trailers += line


def test_pipelined_requests_are_answered_in_order() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            # Three requests in one segment, the middle one with a body; then a fourth later.
            writer.write(
                b"GET /anything?n=1 HTTP/1.1\r\nHost: a\r\n\r\n"
                b"POST /anything?n=2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
                b"GET /anything?n=3 HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            for n in (1, 2, 3):
                status, fields = await read_head(reader)
                assert status.startswith("HTTP/1.1 200")
                echo = json.loads(await reader.readexactly(int(fields["content-length"])))
                assert echo["query"] == f"n={n}"
                assert echo["body_size"] == (5 if n == 2 else 0)
            writer.write(b"GET /anything?n=4 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            status, _, body = split_response(await reader.read())
            assert status == 200 and json.loads(body)["query"] == "n=4"
            writer.close()
            assert gw.stats.requests_total == 4

    run(main())


def test_request_trailers_reach_the_upstream_and_response_trailers_the_client() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, fields = await read_head(reader)
        assert fields.get("transfer-encoding") == "chunked"
        body, trailers = await read_chunked(reader)
        seen.append(body)
        seen.append(trailers)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n"
            b"5\r\nworld\r\n0\r\nX-Checksum: abc\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with raw_upstream(handler) as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(
                b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\r\n"
                b"5\r\nhello\r\n0\r\nX-Request-Sum: 42\r\n\r\n"
            )
            status, fields = await read_head(reader)
            assert status.startswith("HTTP/1.1 200")
            assert fields["transfer-encoding"] == "chunked"
            body, trailers = await read_chunked(reader)
            assert body == b"world"
            assert trailers == b"x-checksum: abc\r\n"
            writer.close()
        assert seen == [b"hello", b"x-request-sum: 42\r\n"]

    run(main())


def test_http_1_0_is_answered_and_closed() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            # A streamed (chunked) upstream response has no length: HTTP/1.0 gets it close-delimited.
            writer.write(b"GET /stream?n=3&size=10&ms=0 HTTP/1.0\r\nHost: a\r\n\r\n")
            raw = await reader.read()
            status, fields, body = split_response(raw)
            assert status == 200 and "transfer-encoding" not in fields
            assert fields["connection"] == ["close"]
            assert body == b"A" * 10 + b"B" * 10 + b"C" * 10
            writer.close()
            # HTTP/1.0 asking for keep-alive keeps the connection.
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            for _ in range(2):
                writer.write(b"GET /hello HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
                _, fields = await read_head(reader)
                assert fields["connection"] == "keep-alive"
                assert await reader.readexactly(int(fields["content-length"])) == b"hello from up\n"
            writer.close()

    run(main())


def test_malformed_request_is_400_and_counted() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET / HTTP/1.1\r\nHost a\r\n\r\n")  # no colon
            status, fields, body = split_response(await reader.read())
            writer.close()
            assert status == 400 and body == b"bad request\n" and fields["connection"] == ["close"]
            assert gw.stats.local_replies["bad_request"] == 1
            # A broken chunked body while the request is in flight ends that request with a 400
            # (issue 13: it used to be a reset without an answer).
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"POST /anything HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
            await wait_for(lambda: gw.stats.requests_active == 1)
            writer.write(b"zz\r\n")
            assert split_response(await reader.read())[0] == 400
            writer.close()
            await wait_for(lambda: gw.stats.resets["client_body_error"] == 1)

    run(main())


def test_idle_keep_alive_connection_closes_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downstream, "KEEPALIVE_S", 0.3)

    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            _, fields = await read_head(reader)
            await reader.readexactly(int(fields["content-length"]))
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
            assert loop.time() - started >= 0.25
            writer.close()

    run(main())


def test_drain_closes_idle_connections_and_lets_busy_ones_finish() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw:
            idle_r, idle_w = await asyncio.open_connection("127.0.0.1", gw.port)
            idle_w.write(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            _, fields = await read_head(idle_r)
            await idle_r.readexactly(int(fields["content-length"]))
            busy_r, busy_w = await asyncio.open_connection("127.0.0.1", gw.port)
            busy_w.write(b"GET /slow?ms=400 HTTP/1.1\r\nHost: a\r\n\r\n")
            await wait_for(lambda: gw.stats.requests_active == 1)
            await gw.server.stop_accepting()
            assert await asyncio.wait_for(idle_r.read(), 5) == b""  # idle: closed at once
            status, fields, body = split_response(await asyncio.wait_for(busy_r.read(), 5))
            assert status == 200 and fields["connection"] == ["close"]
            idle_w.close()
            busy_w.close()

    run(main())


def test_slow_client_pauses_the_upstream() -> None:
    sent = [0]
    total = 64 << 20

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        piece = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            while sent[0] < total:
                writer.write(piece)
                await writer.drain()
                sent[0] += len(piece)
        writer.close()

    async def main() -> None:
        async with raw_upstream(handler) as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, limit=65536)
            writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            await read_head(reader)
            await asyncio.sleep(1.0)  # the client reads nothing meanwhile
            # Socket buffers on both sides hold a few MiB at most; the proxy does not buffer the rest.
            assert sent[0] < 24 << 20
            got = 0
            while got < total:
                data = await reader.read(1 << 20)
                assert data
                got += len(data)
            assert sent[0] == total
            writer.close()

    run(main(), timeout=120)


def test_slow_upstream_pauses_the_client() -> None:
    received = [0]
    go = asyncio.Event()
    total = 64 << 20

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, fields = await read_head(reader)
        await go.wait()  # read nothing until told
        length = int(fields["content-length"])
        while received[0] < length:
            data = await reader.read(1 << 20)
            if not data:
                break
            received[0] += len(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with raw_upstream(handler) as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % total)
            piece = b"y" * 65536
            pushed = 0

            async def push() -> None:
                nonlocal pushed
                while pushed < total:
                    writer.write(piece)
                    await writer.drain()
                    pushed += len(piece)

            pusher = asyncio.ensure_future(push())
            await asyncio.sleep(1.0)
            assert pushed < 24 << 20  # the proxy stopped reading the client
            go.set()
            await pusher
            status, _, body = split_response(await reader.readuntil(b"ok"))
            assert status == 200 and body == b"ok"
            assert received[0] == total
            writer.close()

    run(main(), timeout=120)


def test_oversized_head_in_pieces_is_one_431() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up, top="max_request_header_size: 2048")) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 4000 + b"\r\nX-Next: 1\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            with contextlib.suppress(ConnectionError):
                writer.write(b"X-More: " + b"w" * 4000 + b"\r\n\r\n")
                await writer.drain()
            status, _, body = split_response(await reader.read())
            writer.close()
            assert status == 431 and body == b"request headers too large\n"
            assert gw.stats.local_replies["request_headers_too_large"] == 1

    run(main())


def test_field_names_are_remembered_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Field names are decoded once and remembered (h1.FIELD_NAMES); a client inventing a new name
    per request fills the memory only up to its bound, and every name still arrives lower-cased."""
    monkeypatch.setattr(h1, "FIELD_NAMES_MAX", len(h1.FIELD_NAMES) + 8)

    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            for i in range(20):
                long_name = "X-Long-" + "n" * h1.FIELD_NAME_KEPT
                writer.write(
                    f"GET /n{i} HTTP/1.1\r\nHost: x\r\nX-Invented-{i}: v{i}\r\nX-MiXeD: same\r\n"
                    f"{long_name}: {i}\r\n\r\n".encode()
                )
                status, fields = await read_head(reader)
                assert status == "HTTP/1.1 200 OK"
                echo = json.loads(await reader.readexactly(int(fields["content-length"])))
                got = dict(echo["headers"])
                assert got[f"x-invented-{i}"] == f"v{i}" and got["x-mixed"] == "same"
                assert got[long_name.lower()] == str(i)
            writer.close()
        assert len(h1.FIELD_NAMES) <= h1.FIELD_NAMES_MAX
        assert h1.FIELD_NAMES[b"X-MiXeD"] == "x-mixed"
        assert long_name.encode() not in h1.FIELD_NAMES  # too long to be kept

    run(main())
