"""The proxy end to end, in process: upstream aiohttp servers and the Gateway on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import proxy, run, upstream


def config(up: str, **extra: str) -> str:
    cluster_extra = extra.get("cluster", "")
    return f"""
    listen: 127.0.0.1:0
    access_log: null
    {extra.get("top", "")}
    clusters:
      web: {{endpoints: ["{up}"]{cluster_extra}}}
    routes:
      - match: {{prefix: /}}
        cluster: web
    """


def url(gw: Any, path: str) -> str:
    return f"http://127.0.0.1:{gw.port}{path}"


async def raw_request(port: int, data: bytes) -> bytes:
    """Send bytes, read until the server closes (requests carry Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = await reader.read()
    writer.close()
    return out


def split_response(raw: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, body


def test_get_echo_with_forwarding_headers() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw, aiohttp.ClientSession() as s:
            async with s.get(url(gw, "/anything?q=1"), headers={"X-Forwarded-For": "10.0.0.1"}) as r:
                assert r.status == 200
                assert r.headers.getall("Via") == ["1.1 sluice"]
                echo = await r.json()
            got = {k.lower(): v for k, v in echo["headers"]}
            assert echo["path"] == "/anything" and echo["query"] == "q=1"
            assert got["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
            assert got["x-forwarded-proto"] == "http"
            assert got["x-forwarded-host"] == f"127.0.0.1:{gw.port}"
            assert got["host"] == f"127.0.0.1:{gw.port}"  # Host is kept
            assert got["via"] == "1.1 sluice"
            assert got["x-request-id"]

    run(main())


def test_hop_by_hop_headers_are_removed_both_ways() -> None:
    async def handler(request: web.Request) -> web.Response:
        seen = sorted(k.lower() for k in request.headers)
        resp = web.Response(text=json.dumps(seen))
        resp.headers["Connection"] = "X-Secret-Hop"
        resp.headers["X-Secret-Hop"] = "1"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["Proxy-Authenticate"] = "Basic"
        resp.headers["X-End-To-End"] = "kept"
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)

    async def main() -> None:
        async with upstream(app) as up, proxy(config(up)) as gw:
            raw = await raw_request(
                gw.port,
                b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close, X-Custom-Hop\r\nX-Custom-Hop: 1\r\n"
                b"Keep-Alive: 300\r\nProxy-Authorization: Basic eA==\r\nTE: trailers\r\n"
                b"Proxy-Connection: keep-alive\r\nUpgrade-Insecure-Requests: 1\r\n\r\n",
            )
            status, headers, body = split_response(raw)
            assert status == 200
            seen = json.loads(body)
            for hop in ("x-custom-hop", "keep-alive", "proxy-authorization", "te", "proxy-connection"):
                assert hop not in seen
            assert "upgrade-insecure-requests" in seen  # not hop-by-hop, just similar-looking
            assert "x-secret-hop" not in headers and "keep-alive" not in headers
            assert "proxy-authenticate" not in headers
            assert headers["x-end-to-end"] == ["kept"]

    run(main())


def test_streaming_response_is_not_buffered() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"first")
        await release.wait()  # the client must see "first" before the upstream goes on
        await resp.write(b"second")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/s", handler)

    async def main() -> None:
        async with (
            upstream(app) as up,
            proxy(config(up)) as gw,
            aiohttp.ClientSession() as s,
            s.get(url(gw, "/s")) as r,
        ):
            assert r.headers.get("Transfer-Encoding") == "chunked"
            first = await r.content.readexactly(5)
            assert first == b"first"
            release.set()
            assert await r.content.read() == b"second"

    run(main())


def test_streaming_request_is_not_buffered() -> None:
    got_first = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        assert request.headers.get("Transfer-Encoding") == "chunked"
        first = await request.content.readexactly(5)
        got_first.set()
        rest = await request.content.read()
        return web.Response(text=(first + rest).decode())

    app = web.Application()
    app.router.add_post("/u", handler)

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        await got_first.wait()  # the upstream must have it before the client sends more
        yield b"second"

    async def main() -> None:
        async with (
            upstream(app) as up,
            proxy(config(up)) as gw,
            aiohttp.ClientSession() as s,
            s.post(url(gw, "/u"), data=body()) as r,
        ):
            assert r.status == 200
            assert await r.text() == "firstsecond"

    run(main())


def test_large_bodies_both_ways() -> None:
    size = 20 * 1024 * 1024

    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw, aiohttp.ClientSession() as s:
            # Upload with Content-Length.
            async with s.post(url(gw, "/anything"), data=b"z" * size) as r:
                assert (await r.json())["body_size"] == size

            # Upload chunked.
            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(20):
                    yield b"y" * (1024 * 1024)

            async with s.post(url(gw, "/anything"), data=chunks()) as r:
                echo = await r.json()
                assert echo["body_size"] == size and echo["chunked"]
            # Download with Content-Length.
            async with s.get(url(gw, f"/bytes?size={size}")) as r:
                assert r.headers["Content-Length"] == str(size)
                total = 0
                async for chunk in r.content.iter_any():
                    total += len(chunk)
                assert total == size
            # Download chunked.
            async with s.get(url(gw, "/stream?n=40&size=262144&ms=0")) as r:
                assert len(await r.read()) == 40 * 262144

    run(main(), timeout=120)


def test_keep_alive_to_the_upstream_is_reused() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw, aiohttp.ClientSession() as s:
            for _ in range(10):
                async with s.get(url(gw, "/hello")) as r:
                    assert r.status == 200
                    await r.read()
            pool = gw.generation.clusters["web"]
            assert pool.connects == 1
            assert pool.reuses == 9

    run(main())


def test_head_and_204_have_no_body() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw, aiohttp.ClientSession() as s:
            async with s.head(url(gw, "/bytes?size=100")) as r:
                assert r.status == 200 and r.headers["Content-Length"] == "100"
            async with s.get(url(gw, "/status/204")) as r:
                assert r.status == 204
            # The connection is still in sync afterwards.
            async with s.get(url(gw, "/hello")) as r:
                assert await r.text() == "hello from up\n"
            assert gw.generation.clusters["web"].connects == 1

    run(main())


def test_no_route_is_404() -> None:
    async def main() -> None:
        cfg = config("127.0.0.1:9").replace("prefix: /", "prefix: /api")
        async with proxy(cfg) as gw, aiohttp.ClientSession() as s:
            async with s.get(url(gw, "/other")) as r:
                assert r.status == 404
                assert await r.text() == "no route\n"
            assert gw.stats.local_replies["no_route"] == 1

    run(main())


def test_connect_failure_is_502() -> None:
    async def main() -> None:
        # A port that was just free: nothing listens there.
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        async with proxy(config(f"127.0.0.1:{port}")) as gw, aiohttp.ClientSession() as s:
            async with s.get(url(gw, "/x")) as r:
                assert r.status == 502
                assert await r.text() == "upstream connect error\n"
            assert gw.stats.local_replies["upstream_connect_failure"] == 1

    run(main())


def test_upstream_timeout_is_504() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up, cluster=", timeout: 0.2")) as gw:
            async with aiohttp.ClientSession() as s, s.get(url(gw, "/slow?ms=5000")) as r:
                assert r.status == 504
                assert await r.text() == "upstream request timeout\n"
            assert gw.stats.local_replies["upstream_timeout"] == 1

    run(main())


def test_oversized_request_headers_are_431() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up, top="max_request_header_size: 2048")) as gw:
            # Many headers, each small: over the total.
            many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(60))
            raw = await raw_request(gw.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + many + b"\r\n")
            status, _, body = split_response(raw)
            assert status == 431 and body == b"request headers too large\n"
            # One huge header: over aiohttp's line limit.
            huge = b"X-Big: " + b"v" * 20000 + b"\r\n"
            raw = await raw_request(gw.port, b"GET / HTTP/1.1\r\nHost: a\r\n" + huge + b"\r\n")
            assert split_response(raw)[0] == 431
            assert gw.stats.local_replies["request_headers_too_large"] == 2

    run(main())


def test_retry_idempotent_request_on_another_endpoint() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        async with upstream() as up:
            cfg = config(up).replace(f'["{up}"]', f'["127.0.0.1:{dead}", "{up}"]')
            async with proxy(cfg) as gw, aiohttp.ClientSession() as s:
                for _ in range(4):
                    async with s.get(url(gw, "/hello")) as r:
                        assert r.status == 200
                pool = gw.generation.clusters["web"]
                # The dead endpoint was tried once, then skipped (passive health).
                assert pool.connect_failures == 1
                assert pool.endpoints[0].down_until > 0

    run(main())


def test_passive_health_backoff_doubles_to_a_cap() -> None:
    from sluice.proxy.clusters import ClusterPool
    from sluice.proxy.upstream import ConnectFailed

    now = [100.0]

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        pool = ClusterPool("c", [("127.0.0.1", dead)], connect_timeout=1.0, clock=lambda: now[0])
        waits = []
        for _ in range(6):
            with pytest.raises(ConnectFailed):
                await pool.acquire()
            waits.append(pool.endpoints[0].down_until - now[0])
            now[0] = pool.endpoints[0].down_until  # the endpoint is due again
        assert waits == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
        # All endpoints down: still tried (panic mode) rather than refusing outright.
        assert pool.pick() is pool.endpoints[0]

    run(main())


def test_expect_100_continue_is_answered_by_the_proxy() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(
                b"POST /anything HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
                b"Connection: close\r\n\r\n"
            )
            await writer.drain()
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100")
            writer.write(b"hello")
            status, _, body = split_response(await reader.read())
            writer.close()
            assert status == 200
            echo = json.loads(body)
            assert echo["body_size"] == 5
            assert "expect" not in {k.lower() for k, _ in echo["headers"]}

    run(main())


def test_snapshot_for_the_admin_endpoint() -> None:
    async def main() -> None:
        async with upstream() as up, proxy(config(up)) as gw, aiohttp.ClientSession() as s:
            async with s.get(url(gw, "/hello")) as r:
                await r.read()
            snap = gw.snapshot()
            assert snap["stats"]["requests_total"] == 1
            assert snap["stats"]["responses"] == {"2xx": 1}
            assert snap["clusters"]["web"]["connects"] == 1
            assert snap["clusters"]["web"]["endpoints"][0]["healthy"] is True
            assert snap["generation"]["number"] == 1
            json.dumps(snap)  # serializable as is

    run(main())


def test_pool_exhausted_is_503() -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/hold", handler)

    async def main() -> None:
        cfg = config("UP", cluster=", max_connections: 1, connect_timeout: 0.2")
        async with upstream(app) as up, proxy(cfg.replace("UP", up)) as gw, aiohttp.ClientSession() as s:
            first = asyncio.ensure_future(s.get(url(gw, "/hold")))
            await entered.wait()  # the only connection is busy now
            async with s.get(url(gw, "/hold")) as r:
                assert r.status == 503 and await r.text() == "upstream overflow\n"
            release.set()
            resp = await first
            assert resp.status == 200
            resp.release()
            assert gw.stats.local_replies["upstream_overflow"] == 1

    run(main())


def test_host_rewrite() -> None:
    async def main() -> None:
        cfg = config("UP", cluster=', host_rewrite: "backend.internal"')
        async with upstream() as up, proxy(cfg.replace("UP", up)) as gw, aiohttp.ClientSession() as s:
            async with s.get(url(gw, "/anything")) as r:
                got = {k.lower(): v for k, v in (await r.json())["headers"]}
            assert got["host"] == "backend.internal"
            assert got["x-forwarded-host"] == f"127.0.0.1:{gw.port}"

    run(main())
