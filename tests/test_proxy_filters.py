"""The proxy with real filters (built-in Zig filters and the AssemblyScript fixtures)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import ROOT, proxy, run, upstream, wait_for

from sluice import BUILTIN_FILTERS_DIR
from sluice.abi import PluginState, StreamInfo
from sluice.proxy import exchange

FIXTURES = ROOT / "tests" / "fixtures" / "as" / "build"
FILTERS = BUILTIN_FILTERS_DIR


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not built")
    return path


def url(gw: Any, path: str) -> str:
    return f"http://127.0.0.1:{gw.port}{path}"


def test_route_matches_on_the_header_a_filter_set() -> None:
    need(FILTERS / "ab.wasm")

    async def main() -> None:
        async with upstream(name="stable") as stable, upstream(name="canary") as canary:
            cfg = f"""
            listen: 127.0.0.1:0
            access_log: null
            filters_dir: {FILTERS}
            clusters:
              stable: {{endpoints: ["{stable}"]}}
              canary: {{endpoints: ["{canary}"]}}
            chain:
              - name: ab
                module: ab.wasm
                config: {{variants: {{canary: 100, stable: 0}}}}
            routes:
              - match: {{prefix: /, headers: {{x-variant: canary}}}}
                cluster: canary
              - match: {{prefix: /}}
                cluster: stable
            """
            async with proxy(cfg) as gw, aiohttp.ClientSession() as s:
                async with s.get(url(gw, "/anything")) as r:
                    echo = await r.json()
                assert echo["upstream"] == "canary"
                assert ["X-Variant", "canary"] in echo["headers"] or ["x-variant", "canary"] in echo["headers"]
                assert gw.generation.clusters["canary"].connects == 1
                assert gw.generation.clusters["stable"].connects == 0

    run(main())


def as_config(up: str, *filters: str, extra: str = "", match: dict[str, str] | None = None) -> str:
    chain = "\n".join(
        f"              - {{name: {f}, module: {f}.wasm"
        + (f", match: {match[f]}" if match and f in match else "")
        + "}"
        for f in filters
    )
    return f"""
            listen: 127.0.0.1:0
            access_log: null
            filters_dir: {FIXTURES}
            {extra}
            clusters:
              web: {{endpoints: ["{up}"]}}
            chain:
{chain}
            routes:
              - match: {{prefix: /}}
                cluster: web
            """


def test_local_reply_from_a_filter_never_reaches_the_upstream() -> None:
    need(FIXTURES / "local_reply.wasm")
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text="upstream")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)

    async def main() -> None:
        async with upstream(app) as up, proxy(as_config(up, "headers", "local_reply")) as gw:
            async with aiohttp.ClientSession() as s:
                async with s.post(url(gw, "/deny/x"), data=b"a body that is dropped") as r:
                    assert r.status == 403
                    assert r.headers["x-denied"] == "1"
                    assert r.headers["x-as-filter"] == "headers"
                    assert await r.text() == "denied by as"
                async with s.get(url(gw, "/ok")) as r:
                    assert await r.text() == "upstream"
                    assert r.headers["x-as-filter"] == "headers"
            assert hits == ["/ok"]
            assert gw.stats.local_replies[""] + gw.stats.local_replies["filter"] == 1

    run(main())


def test_body_filter_buffers_and_rewrites() -> None:
    need(FIXTURES / "body.wasm")

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)

    async def main() -> None:
        async with (
            upstream(app) as up,
            proxy(as_config(up, "body")) as gw,
            aiohttp.ClientSession() as s,
            s.post(url(gw, "/e"), data=b"hello world") as r,
        ):
            assert await r.read() == b"[as]HELLO WORLD"

    run(main())


def test_paused_body_over_the_limit_is_413() -> None:
    need(FIXTURES / "body.wasm")

    async def main() -> None:
        # 8 MiB cannot arrive in one read (the server's reader pauses at a high-water mark), so
        # the filter pauses on early pieces and the buffer outgrows 64 KiB before end of stream.
        async with upstream() as up, proxy(as_config(up, "body", extra="max_body_buffer: 64KiB")) as gw:
            async with aiohttp.ClientSession() as s, s.post(url(gw, "/e"), data=b"x" * (8 << 20)) as r:
                assert r.status == 413
                # The body filter encodes the reply too (its response-body rewrite adds "[as]").
                assert await r.text() == "[as]request body too large\n"
            assert gw.stats.local_replies["request_payload_too_large"] == 1

    run(main())


def test_filter_match_prefix_limits_where_a_filter_runs() -> None:
    need(FIXTURES / "headers.wasm")

    async def main() -> None:
        cfg = as_config("127.0.0.1:1", "headers", match={"headers": "/api"})
        async with (
            upstream() as up,
            proxy(cfg.replace("127.0.0.1:1", up)) as gw,
            aiohttp.ClientSession() as s,
        ):
            async with s.get(url(gw, "/api/x")) as r:
                assert r.headers.get("x-as-filter") == "headers"
            async with s.get(url(gw, "/other")) as r:
                assert "x-as-filter" not in r.headers

    run(main())


def test_callout_through_a_cluster() -> None:
    need(FIXTURES / "callout.wasm")

    async def authz(request: web.Request) -> web.Response:
        if request.headers.get("x-user") == "alice":
            return web.Response(text="ok-alice")
        return web.Response(status=403)

    auth_app = web.Application()
    auth_app.router.add_get("/check", authz)

    async def main() -> None:
        async with upstream() as up, upstream(auth_app) as auth:
            cfg = as_config(up, "callout").replace(
                "clusters:\n", f'clusters:\n              authz: {{endpoints: ["{auth}"]}}\n'
            )
            async with proxy(cfg) as gw, aiohttp.ClientSession() as s:
                async with s.get(url(gw, "/anything"), headers={"x-user": "alice"}) as r:
                    assert r.status == 200
                    echo = await r.json()
                    assert ["X-Authz", "ok-alice"] in echo["headers"] or ["x-authz", "ok-alice"] in echo["headers"]
                async with s.get(url(gw, "/anything"), headers={"x-user": "mallory"}) as r:
                    assert r.status == 403
                    assert await r.text() == "forbidden"
            # The callout cluster is gone: the filter's failure path answers.
            cfg = as_config(up, "callout").replace(
                "clusters:\n", 'clusters:\n              authz: {endpoints: ["127.0.0.1:9"]}\n'
            )
            async with proxy(cfg) as gw, aiohttp.ClientSession() as s, s.get(url(gw, "/x")) as r:
                assert r.status == 503 and await r.text() == "authz unavailable"

    run(main())


def test_stream_info_reaches_the_access_log_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    need(FIXTURES / "headers.wasm")
    infos: list[Any] = []

    class Recorded(StreamInfo):
        """The exchange's StreamInfo, kept for the test (the one the chain hands each filter's stream)."""

        def __init__(self) -> None:
            super().__init__()
            infos.append(self)

    monkeypatch.setattr(exchange, "StreamInfo", Recorded)

    async def main() -> None:
        async with upstream() as up, proxy(as_config(up, "headers")) as gw, aiohttp.ClientSession() as s:
            plugin = gw.generation.filters[0].plugin
            async with s.post(url(gw, "/anything"), data=b"12345") as r:
                assert json.loads(await r.text())["body_size"] == 5
            assert plugin.report().counters.streams == 1
            info = infos[0]
            assert info.route_name == "route0" and info.cluster_name == "web"
            assert info.response_code == 200 and info.request_size == 5
            assert info.upstream_address == up
            assert info.source_address.startswith("127.0.0.1:")
            assert info.destination_address == f"127.0.0.1:{gw.port}"
            assert info.duration_ns > 0

    run(main())


def test_client_disconnect_while_a_filter_waits_completes_the_stream() -> None:
    need(FIXTURES / "callout.wasm")
    hold = asyncio.Event()
    asked = asyncio.Event()

    async def authz(request: web.Request) -> web.Response:
        asked.set()
        await hold.wait()
        return web.Response(text="late")

    auth_app = web.Application()
    auth_app.router.add_get("/check", authz)

    async def main() -> None:
        async with upstream() as up, upstream(auth_app) as auth:
            cfg = as_config(up, "callout").replace(
                "clusters:\n", f'clusters:\n              authz: {{endpoints: ["{auth}"]}}\n'
            )
            async with proxy(cfg) as gw:
                plugin = gw.generation.filters[0].plugin
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
                await writer.drain()
                await asked.wait()  # the filter holds the request, waiting for its callout
                assert plugin.report().active_streams == 1
                writer.close()  # the client gives up
                await wait_for(lambda: plugin.report().active_streams == 0)
                assert gw.stats.resets["client_disconnect"] == 1
                hold.set()  # the late callout answer finds the stream gone, harmlessly
                async with aiohttp.ClientSession() as s, s.get(url(gw, "/y")) as r:
                    assert r.status == 200

    run(main())


def test_generation_swap_keeps_in_flight_requests_on_the_old_one() -> None:
    """The hot-reload building blocks: build_generation + install, retirement at the last request."""
    need(FIXTURES / "headers.wasm")
    from conftest import make_config

    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text="old route")

    old_app = web.Application()
    old_app.router.add_get("/slow", slow)

    async def main() -> None:
        async with (
            upstream(old_app) as old_up,
            upstream(name="new") as new_up,
            proxy(as_config(old_up, "headers")) as gw,
            aiohttp.ClientSession() as s,
        ):
            old = gw.generation
            plugin = old.filters[0].plugin
            pending = asyncio.ensure_future(s.get(url(gw, "/slow")))
            await entered.wait()
            new = await gw.build_generation(make_config(as_config(new_up, "headers")))
            assert gw.install(new) is old
            assert gw.generation is new and old.retired and not old.disposed
            async with s.get(url(gw, "/anything")) as r:
                assert (await r.json())["upstream"] == "new"
            assert plugin.report().state is not PluginState.RETIRED  # the old request still runs through it
            release.set()
            resp = await pending
            assert await resp.text() == "old route"
            assert resp.headers["x-as-filter"] == "headers"
            resp.release()
            await wait_for(lambda: old.disposed)
            assert plugin.report().state is PluginState.RETIRED
            assert old not in gw.retiring

    run(main())


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_trapping_filter_answers_503_or_is_skipped(tmp_path: Path, policy: str) -> None:
    import wasmtime

    wat = ROOT / "tests" / "fixtures" / "wat" / "failure.wat"
    need(wat)
    (tmp_path / "failure.wasm").write_bytes(wasmtime.wat2wasm(wat.read_text()))

    async def main() -> None:
        async with upstream() as up:
            cfg = f"""
            listen: 127.0.0.1:0
            access_log: null
            filters_dir: {tmp_path}
            clusters:
              web: {{endpoints: ["{up}"]}}
            chain:
              - {{name: boom, module: failure.wasm, config: request_headers, failure_policy: {policy}}}
            routes:
              - match: {{prefix: /}}
                cluster: web
            """
            async with proxy(cfg) as gw, aiohttp.ClientSession() as s:
                async with s.get(url(gw, "/trap")) as r:
                    if policy == "fail_closed":
                        assert r.status == 503
                        assert await r.text() == "filter boom failed\n"
                        assert gw.stats.local_replies["wasm_fail_stream"] == 1
                    else:
                        assert r.status == 200
                        assert (await r.json())["path"] == "/trap"
                async with s.get(url(gw, "/fine")) as r:
                    assert r.status == 200

    run(main())
