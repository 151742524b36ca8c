"""Components and proxy-wasm modules in one chain, through the real proxy (issue 15's "done when")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import wasmtime
from aiohttp import web
from conftest import ROOT, make_config, proxy, run, upstream, wait_for
from prometheus_client import generate_latest

from sluice.abi import PluginState
from sluice.proxy.admin import AdminServer
from sluice.proxy.metrics import make_registry

COMPONENTS = ROOT / "tests" / "fixtures" / "components" / "build"
WAT = ROOT / "tests" / "fixtures" / "wat"


def test_a_proxy_wasm_filter_and_a_component_share_a_counter(tmp_path: Path) -> None:
    (tmp_path / "counter.wasm").write_bytes((COMPONENTS / "counter.wasm").read_bytes())
    (tmp_path / "shared_counter.wasm").write_bytes(wasmtime.wat2wasm((WAT / "shared_counter.wat").read_text()))

    async def main() -> None:
        async with upstream() as up:
            cfg = f"""
            listen: 127.0.0.1:0
            access_log: null
            filters_dir: {tmp_path}
            clusters:
              up: {{endpoints: ["{up}"]}}
            chain:
              - name: wasm-counter
                module: shared_counter.wasm
                vm_id: counting
              - name: component-counter
                module: counter.wasm
                vm_id: counting
                failure_policy: fail_closed
            routes:
              - match: {{prefix: /}}
                cluster: up
            """
            async with proxy(cfg) as gw, aiohttp.ClientSession() as s:
                for i in range(1, 6):
                    async with s.get(f"http://127.0.0.1:{gw.port}/n/{i}") as r:
                        assert r.status == 200
                        echo = await r.json()
                        assert r.headers["x-component"] == "counter"
                    seen = {k.lower(): v for k, v in echo["headers"]}
                    # The proxy-wasm filter runs first, the component second: one counter, two steps.
                    assert seen["x-wasm-hits"] == str(2 * i - 1)
                    assert seen["x-component-hits"] == str(2 * i)
                reports = {f.name: f.plugin.report() for f in gw.generation.filters}
                assert reports["component-counter"].module.abi_version == "component sluice:filter@0.1.0"
                assert reports["component-counter"].counters.streams == 5
                assert reports["component-counter"].counters.traps == 0

    run(main())


def test_component_actions_through_the_proxy() -> None:
    async def checker(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/check", checker)
        async with upstream() as up, upstream(app) as auth:
            cfg = f"""
            listen: 127.0.0.1:0
            access_log: null
            filters_dir: {COMPONENTS}
            clusters:
              up: {{endpoints: ["{up}"]}}
              auth: {{endpoints: ["{auth}"]}}
            chain:
              - name: actions
                module: actions.wasm
                failure_policy: fail_closed
                cpu_deadline_ms: 20
            routes:
              - match: {{prefix: /}}
                cluster: up
            """
            async with proxy(cfg) as gw, aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{gw.port}"
                async with s.get(base + "/reply") as r:
                    assert r.status == 418
                    assert r.headers["x-reply"] == "yes"
                    assert await r.read() == b"teapot"
                async with s.get(base + "/callout") as r:
                    assert r.status == 200
                    seen = {k.lower(): v for k, v in (await r.json())["headers"]}
                    assert seen["x-callout-status"] == "204"
                    assert r.headers["x-actions"] == "seen"
                async with s.get(base + "/trap") as r:
                    assert r.status == 503
                async with s.get(base + "/fine") as r:  # a fresh instance serves after the trap
                    assert r.status == 200
                async with s.get(base + "/spin") as r:
                    assert r.status == 503
                async with s.get(base + "/fine") as r:  # within the reload backoff: the policy
                    assert r.status == 503
                report = gw.generation.filters[0].plugin.report()
                assert report.counters.traps == 1
                assert report.counters.deadlines == 1
                assert report.counters.fail_closed == 3
                assert report.counters.reloads == 1  # the second failure is within the backoff
                assert report.state.value == "reloading"
                assert "CPU deadline" in (report.last_error or "")

    run(main())


def test_admin_and_hot_reload_see_a_component_like_a_module(tmp_path: Path) -> None:
    """`/filters` and `/metrics` report the component; a generation swap (new config) retires
    its plugin only after the in-flight request through it has finished, and nothing fails."""
    (tmp_path / "counter.wasm").write_bytes((COMPONENTS / "counter.wasm").read_bytes())
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text="slow")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    def config(up: str, label: str) -> str:
        return f"""
        listen: 127.0.0.1:0
        access_log: null
        filters_dir: {tmp_path}
        clusters:
          up: {{endpoints: ["{up}"]}}
        chain:
          - name: component-counter
            module: counter.wasm
            config: {{label: {label}}}
        routes:
          - match: {{prefix: /}}
            cluster: up
        """

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/slow", slow)
        app.router.add_get("/fast", fast)
        async with upstream(app) as up, proxy(config(up, "one")) as gw, aiohttp.ClientSession() as s:
            admin = AdminServer(gw)
            await admin.start("127.0.0.1", 0)
            try:
                async with s.get(f"http://127.0.0.1:{gw.port}/fast") as r:
                    assert r.status == 200 and r.headers["x-component"] == "counter"
                async with s.get(f"http://127.0.0.1:{admin.port}/filters") as r:
                    body = await r.json()
                text = str(body)
                assert "component sluice:filter@0.1.0" in text and "component-counter" in text
                metrics = generate_latest(make_registry(gw)[0]).decode()
                assert 'abi_version="component sluice:filter@0.1.0"' in metrics, metrics

                old = gw.generation
                plugin = old.filters[0].plugin
                pending = asyncio.ensure_future(s.get(f"http://127.0.0.1:{gw.port}/slow"))
                await entered.wait()
                new = await gw.build_generation(make_config(config(up, "two")))
                assert gw.install(new) is old
                assert new.filters[0].plugin is not plugin  # the config changed: a new plugin
                statuses = []
                for _ in range(5):
                    async with s.get(f"http://127.0.0.1:{gw.port}/fast") as r:
                        statuses.append(r.status)
                assert statuses == [200] * 5
                report = plugin.report()
                assert report.state is not PluginState.RETIRED and report.active_streams == 1  # still serving /slow
                release.set()
                resp = await pending
                assert resp.status == 200 and await resp.text() == "slow"
                resp.release()
                await wait_for(lambda: old.disposed)
                report = plugin.report()
                assert report.state is PluginState.RETIRED and report.vm_count == 0
            finally:
                await admin.stop()

    run(main())
