"""Hostile filters through the real proxy (issue 13, item 8): after each attack the proxy answers
the next 1,000 requests through the same filter correctly, and a route the filter does not cover
is unaffected. Each attack is one WAT fixture (fixtures/wat/hostile_*.wat) that misbehaves only on
a request carrying `x-attack`; every response through it gets `x-filter: ok`, so the 1,000
requests also show the filter itself still runs.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import wasmtime
from conftest import proxy, run, upstream
from prometheus_client import generate_latest

from sluice.abi import PluginReport, PluginState
from sluice.proxy.metrics import make_registry

WAT_DIR = Path(__file__).resolve().parent / "fixtures" / "wat"
FOLLOW_UP = 1000
OTHER_ROUTE = 100


def build(name: str, tmp_path: Path) -> Path:
    (tmp_path / f"{name}.wasm").write_bytes(wasmtime.wat2wasm((WAT_DIR / f"{name}.wat").read_text()))
    return tmp_path


def config(filters_dir: Path, up: str, module: str, extra: str = "") -> str:
    # A generous CPU deadline: the attacks must be stopped by the limits under test, not by it.
    return f"""
    listen: 127.0.0.1:0
    access_log: null
    filters_dir: {filters_dir}
    clusters:
      web: {{endpoints: ["{up}"]}}
    chain:
      - name: hostile
        module: {module}.wasm
        match: /h
        cpu_deadline_ms: 1000
{extra}
    routes:
      - match: {{prefix: /}}
        cluster: web
    """


@contextlib.asynccontextmanager
async def hostile(tmp_path: Path, module: str, extra: str = "") -> AsyncIterator[Any]:
    """The proxy with one hostile filter on /h, in front of a demo upstream."""
    async with upstream() as up, proxy(config(build(module, tmp_path), up, module, extra)) as gw:
        yield gw


def report(gw: Any) -> PluginReport:
    (loaded,) = gw.generation.filters
    result: PluginReport = loaded.report()
    return result


async def attack_then_serve(gw: Any, method: str = "GET", body: bytes | None = None) -> dict[str, Any]:
    """The attack request, then FOLLOW_UP requests through the filter and OTHER_ROUTE past it."""
    base = f"http://127.0.0.1:{gw.port}"
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"{base}/h/attack", headers={"x-attack": "1"}, data=body) as r:
            attack = {"status": r.status, "x-filter": r.headers.get("x-filter"), "echo": await r.json()}
        for i in range(FOLLOW_UP):
            async with s.get(f"{base}/h/{i}") as r:
                echo = await r.json()
                assert r.status == 200, (i, r.status)
                assert r.headers.get("x-filter") == "ok", i
                assert echo["path"] == f"/h/{i}"
        for i in range(OTHER_ROUTE):
            async with s.get(f"{base}/other/{i}") as r:
                await r.read()
                assert r.status == 200 and "x-filter" not in r.headers
    rep = report(gw)
    assert rep.state is PluginState.OK
    assert rep.counters.traps == 0 and rep.counters.deadlines == 0
    assert rep.counters.fail_closed == 0
    return attack


def test_allocator_that_never_reuses_memory_stops_at_the_memory_cap(tmp_path: Path) -> None:
    async def main() -> None:
        async with hostile(tmp_path, "hostile_alloc", "        memory_limit: 2MiB") as gw:
            attack = await attack_then_serve(gw)
            assert attack["status"] == 200 and attack["x-filter"] == "ok"
            assert 1 << 20 < report(gw).memory_bytes <= 2 << 20

    run(main())


def test_enormous_header_maps_are_refused_and_counted(tmp_path: Path) -> None:
    async def main() -> None:
        async with hostile(tmp_path, "hostile_headers") as gw:
            attack = await attack_then_serve(gw)
            # The floods were removed again, and the 3000-entry response map refused whole.
            assert attack["status"] == 200 and attack["x-filter"] == "ok"
            sent = [k.lower() for k, _ in attack["echo"]["headers"]]
            assert "x-flood" not in sent and "x-big" not in sent
            refused = report(gw).counters.refused
            # 3000 one-byte adds with 1024 entries allowed (the map had a few already), then
            # 4000-byte values up to 256 KiB, then the response's set_header_map_pairs.
            assert refused["limit.max_headers"] >= 3000 - 1024 + 1
            assert refused["limit.max_header_bytes"] >= 200 - 256 * 1024 // 4000
            assert refused["limit.max_headers"] + refused["limit.max_header_bytes"] <= 3200 + 1

    run(main())


def test_a_body_grown_past_the_limit_goes_upstream_at_most_at_the_limit(tmp_path: Path) -> None:
    async def main() -> None:
        async with hostile(tmp_path, "hostile_body", "        limits: {max_body_bytes: 1MiB}") as gw:
            attack = await attack_then_serve(gw, "POST", b"x" * 100)
            assert attack["status"] == 200
            # 100 bytes plus 15 chunks of 64 KiB fit in 1 MiB; the 49 others are refused.
            assert attack["echo"]["body_size"] == 100 + 15 * 65536
            assert report(gw).counters.refused == {"limit.max_body_bytes": 49}

    run(main())


def test_a_log_flood_is_rate_limited(tmp_path: Path) -> None:
    async def main() -> None:
        async with hostile(tmp_path, "hostile_log") as gw:
            await attack_then_serve(gw)
            # 5000 lines in one callback: all but the burst are dropped and counted.
            assert gw.suppressed_log_lines("hostile") >= 4000

    run(main())


def test_a_callout_flood_is_bounded_per_root_context(tmp_path: Path) -> None:
    async def main() -> None:
        async with hostile(tmp_path, "hostile_callouts") as gw:
            await attack_then_serve(gw)
            # All 1000 were made within one callback: exactly the limit got through.
            assert report(gw).counters.refused == {"limit.max_callouts": 1000 - 64}

    run(main())


def test_shared_data_and_queue_floods_are_bounded_per_vm_id(tmp_path: Path) -> None:
    async def main() -> None:
        extra = (
            "        limits: {max_shared_keys: 1000, max_shared_bytes: 1MiB, max_queues: 100,"
            " max_queue_depth: 1000}"
        )
        async with hostile(tmp_path, "hostile_shared", extra) as gw:
            await attack_then_serve(gw)
            refused = report(gw).counters.refused
            assert refused["limit.max_shared_keys"] == 5000 - 1000 + 200  # the v<i> keys too
            assert "limit.max_shared_bytes" not in refused  # keys ran out first
            assert refused["limit.max_queues"] == 500 - 100
            assert refused["limit.max_queue_depth"] == 5000 - 1000
            keys, size = gw.runtime.shared_data.usage("hostile")
            assert keys == 1000 and size <= 1 << 20

    run(main())


def test_shared_bytes_are_bounded_per_vm_id(tmp_path: Path) -> None:
    async def main() -> None:
        async with hostile(tmp_path, "hostile_shared", "        limits: {max_shared_bytes: 1MiB}") as gw:
            await attack_then_serve(gw)
            refused = report(gw).counters.refused
            # The 5000 small keys (~30 KiB) fit; of the 200 values of 16 KiB, about 60 do.
            assert 200 - 64 <= refused["limit.max_shared_bytes"] <= 200 - 55
            _, size = gw.runtime.shared_data.usage("hostile")
            assert size <= 1 << 20

    run(main())


def test_thousands_of_metrics_are_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        async with hostile(tmp_path, "hostile_metrics") as gw:
            await attack_then_serve(gw)
            rep = report(gw)
            assert len(rep.metrics) == 1000
            # 2000 new names refused; the 20000 re-definitions of m0 are answered (the oldest
            # of their ids forgotten beyond 16000).
            assert rep.counters.refused == {"limit.max_metrics": 2000}
            registry, _ = make_registry(gw)
            stats = generate_latest(registry).decode()
            assert 'sluice_filter_refused_total{by="limit.max_metrics",filter="hostile"} 2000.0' in stats
            # Each filter-defined metric is its own family (m0_total, m1_total, ...), labelled by filter.
            assert len(re.findall(r'^m\d+_total\{filter="hostile"\}', stats, re.M)) == 1000

    run(main())
