"""Components and proxy-wasm modules in one chain, through the real proxy (issue 15's "done when")."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import wasmtime
from aiohttp import web
from conftest import ROOT, proxy, run, upstream

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
