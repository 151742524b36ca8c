"""Hostile clients through real sockets (issue 13): upgrades that are not WebSocket, transfer
codings, slow heads and bodies, a stalling upstream, slow uploaders against a small cluster, how
rejections are answered, counted and logged, absolute-form targets, 414 and `OPTIONS *`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import aiohttp
import pytest
from conftest import proxy, run, upstream, wait_for
from prometheus_client import generate_latest
from test_proxy_h1 import raw_upstream, read_chunked, read_head
from test_proxy_http import config, split_response

from sluice import BUILTIN_FILTERS_DIR
from sluice.proxy import rejections
from sluice.proxy.metrics import make_registry


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length framed response off a kept-alive connection."""
    line, fields = await read_head(reader)
    body = await reader.readexactly(int(fields.get("content-length", "0")))
    return int(line.split()[1]), fields, body


class Recorder:
    """A raw upstream that answers every request with its request line and the upgrade fields it
    saw, and that switches to a byte echo (prefixed SMUGGLED) when asked to upgrade."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.closed = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line, fields = await read_head(reader)
                self.requests.append((line, fields))
                if fields.get("transfer-encoding") == "chunked":
                    body, _ = await read_chunked(reader)
                else:
                    body = await reader.readexactly(int(fields.get("content-length", "0")))
                if "upgrade" in fields:
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
                    while data := await reader.read(65536):
                        writer.write(b"SMUGGLED:" + data)
                    break
                text = f"{line} body={body.decode()}".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


AUTH_CHAIN = f"""
    filters_dir: {BUILTIN_FILTERS_DIR}
    chain:
      - name: auth
        module: auth.wasm
        config: {{api_keys: [{{key: "k1", subject: alice}}]}}
"""


# -- 1. upgrades ------------------------------------------------------------------------------


def test_h2c_upgrade_is_proxied_as_plain_http_and_what_follows_passes_the_filters() -> None:
    async def main() -> None:
        rec = Recorder()
        async with raw_upstream(rec) as up, proxy(config(up, top=AUTH_CHAIN)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            # An authorized h2c upgrade, then a request without a key in the same segment: the
            # second must meet the auth filter, not ride a tunnel to the upstream.
            writer.write(
                b"GET /a HTTP/1.1\r\nHost: a\r\nX-Api-Key: k1\r\nUpgrade: h2c\r\n"
                b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
                b"GET /admin-only HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            status, _, body = await asyncio.wait_for(read_response(reader), 5)
            assert status == 200 and body.startswith(b"GET /a HTTP/1.1")
            status, _, body = await asyncio.wait_for(read_response(reader), 5)
            assert status == 401 and b"SMUGGLED" not in body
            # An upgrade request with a body: the body is read as its body, the next one as HTTP.
            writer.write(
                b"POST /b HTTP/1.1\r\nHost: a\r\nX-Api-Key: k1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
                b"Content-Length: 5\r\n\r\nhello"
                b"GET /c HTTP/1.1\r\nHost: a\r\nX-Api-Key: k1\r\n\r\n"
            )
            status, _, body = await asyncio.wait_for(read_response(reader), 5)
            assert status == 200 and body == b"POST /b HTTP/1.1 body=hello"
            status, _, body = await asyncio.wait_for(read_response(reader), 5)
            assert status == 200 and body.startswith(b"GET /c HTTP/1.1")
            writer.close()
            assert [line for line, _ in rec.requests] == ["GET /a HTTP/1.1", "POST /b HTTP/1.1", "GET /c HTTP/1.1"]
            assert all("upgrade" not in fields and "http2-settings" not in fields for _, fields in rec.requests)
            assert gw.stats.websocket_upgrades == 0

    run(main())


def test_websocket_tunnels_only_on_routes_that_allow_it() -> None:
    async def main() -> None:
        async with upstream(name="ws") as up:
            cfg = f"""
            listen: 127.0.0.1:0
            access_log: null
            clusters:
              web: {{endpoints: ["{up}"]}}
            routes:
              - match: {{prefix: /ws, headers: {{x-plain: "1"}}}}
                cluster: web
                upgrades: []
              - match: {{prefix: /}}
                cluster: web
                upgrades: [websocket]
            """
            async with proxy(cfg) as gw, aiohttp.ClientSession() as s:
                async with s.ws_connect(f"http://127.0.0.1:{gw.port}/ws") as ws:
                    await ws.send_str("hi")
                    assert (await ws.receive()).data == "ws: hi"
                assert gw.stats.websocket_upgrades == 1
                with pytest.raises(aiohttp.WSServerHandshakeError):
                    await s.ws_connect(f"http://127.0.0.1:{gw.port}/ws", headers={"x-plain": "1"})
                assert gw.stats.websocket_upgrades == 1

    run(main())


# -- 2. transfer codings ------------------------------------------------------------------------


def test_transfer_codings_other_than_chunked_are_501_and_never_forwarded() -> None:
    async def main() -> None:
        rec = Recorder()
        async with raw_upstream(rec) as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(
                b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                b"5\r\n\x1f\x8b\x08\x00\x00\r\n0\r\n\r\n"
            )
            status, fields, body = split_response(await asyncio.wait_for(reader.read(), 5))
            writer.close()
            assert status == 501 and fields["server"] == ["sluice"] and body == b"transfer coding not implemented\n"
            assert rec.requests == []
            assert gw.stats.rejections["unsupported_transfer_coding"] == 1

    run(main())


# -- 3. timeouts --------------------------------------------------------------------------------


def test_a_head_sent_byte_by_byte_gets_408_at_the_default_10s() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            loop = asyncio.get_running_loop()
            started = loop.time()
            head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 100

            async def trickle() -> None:
                with contextlib.suppress(ConnectionError):
                    for byte in head:
                        writer.write(bytes([byte]))
                        await asyncio.sleep(0.25)

            sender = asyncio.ensure_future(trickle())
            raw = await asyncio.wait_for(reader.read(), 14)
            sender.cancel()
            writer.close()
            status, fields, _ = split_response(raw)
            assert status == 408 and fields["server"] == ["sluice"]
            assert 9.5 <= loop.time() - started <= 12
            assert gw.stats.rejections["request_header_timeout"] == 1

    run(main())


def test_a_stalled_body_gets_408_and_releases_the_upstream_connection() -> None:
    async def main() -> None:
        rec = Recorder()
        top = "timeouts: {request_body_idle: 0.5}"
        async with raw_upstream(rec) as up, proxy(config(up, top=top)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            # Bigger than the prebuffer: the upstream connection is taken while the body streams.
            writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n" + b"b" * 100_000)
            await wait_for(lambda: len(rec.requests) == 1)
            started = time.monotonic()
            status, fields, body = split_response(await asyncio.wait_for(reader.read(), 5))
            assert status == 408 and body == b"request body timeout\n"
            assert time.monotonic() - started < 2
            await asyncio.wait_for(rec.closed.wait(), 2)  # the upstream connection was closed
            writer.close()
            assert gw.stats.rejections["request_body_timeout"] == 1

    run(main())


def test_the_upstream_timeout_runs_from_the_end_of_the_request_body() -> None:
    async def main() -> None:
        rec = Recorder()
        async with raw_upstream(rec) as up, proxy(config(up, cluster=", timeout: 0.5")) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            size = 200_000 * 8
            writer.write(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(8):  # 1.6 s of upload, longer than the 0.5 s response timeout
                writer.write(b"u" * 200_000)
                await writer.drain()
                await asyncio.sleep(0.2)
            status, _, body = await asyncio.wait_for(read_response(reader), 5)
            writer.close()
            assert status == 200 and body.startswith(b"POST /up HTTP/1.1")

    run(main())


def test_an_invalid_chunk_later_is_400_at_once_and_frees_the_upstream() -> None:
    async def main() -> None:
        rec = Recorder()
        async with raw_upstream(rec) as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await wait_for(lambda: len(rec.requests) == 1)
            started = time.monotonic()
            writer.write(b"nothex\r\n")
            status, fields, _ = split_response(await asyncio.wait_for(reader.read(), 5))
            assert status == 400 and fields["server"] == ["sluice"]
            await asyncio.wait_for(rec.closed.wait(), 2)
            assert time.monotonic() - started < 2
            writer.close()
            assert gw.stats.rejections["bad_request_body"] == 1
            assert gw.stats.local_replies.get("upstream_timeout", 0) == 0

    run(main())


def test_an_upstream_that_stalls_mid_response_is_cut_after_its_idle_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        await writer.drain()
        await asyncio.sleep(30)

    async def main() -> None:
        async with raw_upstream(handler) as up, proxy(config(up, cluster=", idle_timeout: 0.5")) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            started = time.monotonic()
            with contextlib.suppress(ConnectionError):
                raw = await asyncio.wait_for(reader.read(), 5)
                assert raw.endswith(b"part")  # the response started, then the stream was cut
            assert time.monotonic() - started < 2
            writer.close()
            assert gw.stats.resets["upstream_idle_timeout"] == 1

    run(main())


def test_the_optional_stream_limit_answers_408() -> None:
    async def main() -> None:
        top = "timeouts: {stream: 0.5}"
        async with upstream() as up, proxy(config(up, top=top, cluster=", timeout: 10")) as gw:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.port}/slow?ms=3000") as r:
                assert r.status == 408 and await r.text() == "request timeout\n"
            assert gw.stats.rejections["stream_timeout"] == 1

    run(main())


# -- 4. slow uploaders ----------------------------------------------------------------------------


def test_slow_uploaders_cannot_take_every_connection_of_a_cluster() -> None:
    async def main() -> None:
        cluster = ", max_connections: 4, connect_timeout: 0.5, timeout: 30"
        async with upstream() as up, proxy(config(up, cluster=cluster)) as gw:
            writers: list[asyncio.StreamWriter] = []
            readers: list[asyncio.StreamReader] = []

            async def uploader(big: bool) -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                readers.append(reader)
                writers.append(writer)
                size = 10_000_000 if big else 10_000
                # A big body starts with more than the prebuffer (it takes a connection); a small
                # one trickles and is never complete.
                writer.write(b"POST /anything HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
                writer.write(b"x" * (100_000 if big else 100))

            for i in range(24):
                await uploader(big=i % 2 == 0)

            async def trickle() -> None:
                with contextlib.suppress(ConnectionError):
                    while True:
                        for writer in writers:
                            writer.write(b"x")
                        await asyncio.sleep(0.2)

            trickler = asyncio.ensure_future(trickle())
            await asyncio.sleep(1.0)  # every uploader that could take a connection has
            statuses = []
            async with aiohttp.ClientSession() as s:
                for _ in range(20):
                    async with s.get(f"http://127.0.0.1:{gw.port}/hello") as r:
                        statuses.append(r.status)
            trickler.cancel()
            for writer in writers:
                writer.close()
            assert statuses == [200] * 20
            pool = gw.generation.clusters["web"]
            assert pool.upload_connections == 2

    run(main(), timeout=60)


# -- 5. rejections ------------------------------------------------------------------------------


def test_rejections_are_counted_by_reason_logged_once_and_answered_by_sluice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Evil\x01MARKER: 1\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            status, fields, body = split_response(raw)
            assert fields["server"] == ["sluice"] and b"MARKER" not in raw and body == b"bad request\n"
            text = generate_latest(make_registry(gw)[0]).decode()
            assert 'sluice_rejections_total{reason="bad_request"} 1.0' in text
            # A flood of them: counted, but the log is bounded.
            for _ in range(3 * rejections.LOG_BURST):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(b"BAD\x00 / HTTP/1.1\r\n\r\n")
                await reader.read()
                writer.close()
            assert gw.stats.rejections["bad_request"] == 1 + 3 * rejections.LOG_BURST

    with caplog.at_level(logging.INFO, logger="sluice"):
        run(main())
    lines = [r for r in caplog.records if r.name == "sluice.server" and "bad_request" in r.getMessage()]
    assert 1 <= len(lines) <= rejections.LOG_BURST
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in lines)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- 6. request targets ---------------------------------------------------------------------------


def test_absolute_form_is_routed_by_its_path_with_the_host_from_the_target() -> None:
    async def main() -> None:
        async with upstream() as up:
            by_host = 'match: {prefix: /anything, headers: {":authority": "api.example"}}'
            cfg = config(up).replace("match: {prefix: /}", by_host)
            async with proxy(cfg) as gw:
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(b"GET http://api.example/anything?q=1 HTTP/1.1\r\nHost: ignored.example\r\n\r\n")
                status, _, body = await asyncio.wait_for(read_response(reader), 5)
                writer.close()
                assert status == 200
                echo = json.loads(body)
                assert echo["path"] == "/anything" and echo["query"] == "q=1"
                assert {k.lower(): v for k, v in echo["headers"]}["host"] == "api.example"

    run(main())


def test_an_over_long_request_line_is_414_and_big_headers_431() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw:
            for request, expected in (
                (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
                (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
                (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 20_000 + b"\r\n\r\n", 431),
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                with contextlib.suppress(ConnectionError):
                    writer.write(request)
                status, fields, _ = split_response(await asyncio.wait_for(reader.read(), 5))
                writer.close()
                assert status == expected and fields["server"] == ["sluice"]
            assert gw.stats.rejections["request_line_too_long"] == 2

    run(main())


def test_options_asterisk_is_answered_by_the_proxy_and_connect_refused() -> None:
    async def main() -> None:
        rec = Recorder()
        async with raw_upstream(rec) as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
            status, fields, body = await asyncio.wait_for(read_response(reader), 5)
            assert status == 200 and "GET" in fields["allow"] and body == b""
            writer.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            status, fields, _ = split_response(await asyncio.wait_for(reader.read(), 5))
            writer.close()
            assert status == 405 and fields["server"] == ["sluice"]
            assert rec.requests == []

    run(main())


def test_http_versions_other_than_1_0_and_1_1_are_505() -> None:
    async def main() -> None:
        rec = Recorder()
        async with raw_upstream(rec) as up, proxy(config(up)) as gw:
            # Without a version llhttp reads HTTP/0.9; "HTTP/2.0" is no HTTP/1 request either.
            for request in (b"GET /\r\n\r\n", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(request)
                status, fields, _ = split_response(await asyncio.wait_for(reader.read(), 5))
                writer.close()
                assert status == 505 and fields["server"] == ["sluice"]
            assert rec.requests == []
            assert gw.stats.rejections["http_version_not_supported"] == 2

    run(main())
