"""Module imports: Higress's ABI 0.2.100 and host calls sluice does not define.

A module may import `env.proxy_*` calls sluice has no meaning for (Envoy's old
`proxy_set_active_span_tag`, a vendor's extension): they answer UNIMPLEMENTED and the filter
loads, unless its entry sets `strict_imports`. Anything else sluice cannot provide refuses the
module with a message naming each import.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
import wasmtime
from hosting import FilterRig, live_proxy

from sluice import abi
from sluice.abi.types import LogLevel, WasmResult

WAT = Path(__file__).resolve().parent / "fixtures" / "wat"
UNIMPLEMENTED = int(WasmResult.UNIMPLEMENTED)
BAD_ARGUMENT = int(WasmResult.BAD_ARGUMENT)


@pytest.fixture(scope="module")
def higress(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wat") / "higress.wasm"
    out.write_bytes(wasmtime.wat2wasm((WAT / "higress.wat").read_text()))
    return out


def values(rig: FilterRig) -> dict[str, str]:
    return dict(m.split("=", 1) for _, _, m in rig.logs if "=" in m)


def test_a_higress_module_loads_and_its_redis_calls_fail_cleanly(higress: Path) -> None:
    with FilterRig() as rig:
        plugin = rig.load(higress, name="hi", log_level=LogLevel.DEBUG)
        report = plugin.report()
        assert report.module.abi_version == "0.2.100"
        assert report.module.unknown_imports == ("proxy_set_active_span_tag", "proxy_made_up_counter")
        seen = values(rig)
        # proxy_get_log_level: OK, and the filter's own level (DEBUG = 1).
        assert seen["get_log_level"] == "0" and seen["log_level"] == str(int(LogLevel.DEBUG))
        # Redis (real since issue 12): the fixture names no Redis cluster of the config, so init answers
        # BAD_ARGUMENT and a call on it too; the SDKs turn that into "unavailable" and the plugin carries on.
        assert seen["redis_init"] == str(BAD_ARGUMENT)
        assert seen["redis_call"] == str(BAD_ARGUMENT)
        assert "redis=unavailable" in [m for _, _, m in rig.logs]
        # Unknown host calls: UNIMPLEMENTED for an i32 result, zero for any other.
        assert seen["span_tag"] == str(UNIMPLEMENTED)
        assert seen["made_up"] == "0"
        # Named once, when the filter loads.
        warnings = [m for _, level, m in rig.logs if level is LogLevel.WARN]
        assert warnings == [
            "filter hi: host calls sluice does not define answer UNIMPLEMENTED: "
            "proxy_set_active_span_tag, proxy_made_up_counter"
        ]
        ex = rig.request(plugin)
        assert ex.status == 200 and ex.local_reply is None
        assert values(rig)["request_redis_call"] == str(BAD_ARGUMENT)
        assert plugin.report().counters.traps == 0


def test_strict_imports_refuses_the_module_naming_the_calls(higress: Path) -> None:
    with FilterRig() as rig, pytest.raises(abi.PluginLoadError) as info:
        rig.load(higress, strict_imports=True)
    assert info.value.reason == (
        "imports host calls sluice does not define (strict_imports is set): "
        "proxy_set_active_span_tag, proxy_made_up_counter"
    )


def test_other_unknown_imports_refuse_the_module_naming_each(tmp_path: Path) -> None:
    module = tmp_path / "foreign.wasm"
    module.write_bytes(wasmtime.wat2wasm("""
        (module
          (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
          (import "host" "proxy_thing" (func))
          (import "env" "get_secret" (func (result i32)))
          (import "env" "proxy_table" (table 1 funcref))
          (import "env" "proxy_wide" (func (result i32 i32)))
          (memory (export "memory") 1)
          (func (export "proxy_abi_version_0_2_1")))
    """))
    with FilterRig() as rig, pytest.raises(abi.PluginLoadError) as info:
        rig.load(module)
    assert info.value.reason == (
        "imports that sluice does not provide: host.proxy_thing, env.get_secret, "
        "env.proxy_table (not a function), env.proxy_wide (more than one result)"
    )


def test_stubs_stay_with_their_module(higress: Path, tmp_path: Path) -> None:
    # The process-wide linker is untouched: a module compiled later with a known signature for
    # the same name still links to sluice's own functions only, and a strict one is not refused.
    plain = tmp_path / "plain.wasm"
    plain.write_bytes(wasmtime.wat2wasm("""
        (module
          (import "env" "proxy_get_log_level" (func (param i32) (result i32)))
          (memory (export "memory") 1)
          (func (export "proxy_abi_version_0_2_1"))
          (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024)))
    """))
    with FilterRig() as rig:
        rig.load(higress, name="first")
        second = rig.load(plain, name="second", strict_imports=True)
        assert second.report().module.unknown_imports == ()
        assert rig.runtime.compile(plain).unknown_imports == ()


def test_through_the_live_proxy_unknown_imports_are_in_filters(higress: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    def config(port: int) -> str:
        return (
            "listen: 127.0.0.1:0\nadmin: {listen: \"127.0.0.1:0\"}\naccess_log: null\nfilters_dir: filters\n"
            f"cache_dir: cache\nclusters: {{up: {{endpoints: [\"127.0.0.1:{port}\"]}}}}\n"
            "chain: [{name: hi, module: higress.wasm}]\nroutes: [{match: {prefix: /}, cluster: up}]\n"
        )

    async def main() -> None:
        modules = {"higress.wasm": higress.read_bytes()}
        async with live_proxy(tmp_path, config, modules) as live, aiohttp.ClientSession() as s:
            async with s.get(live.url("/")) as r:
                assert r.status == 200 and await r.text() == "up"
            async with s.get(live.admin_url("/filters")) as r:
                info = (await r.json())["hi"]
        assert info["abi_version"] == "0.2.100"
        assert info["unknown_imports"] == ["proxy_set_active_span_tag", "proxy_made_up_counter"]
        warned = [r.getMessage() for r in caplog.records if "does not define" in r.getMessage()]
        assert len(warned) == 1 and "proxy_set_active_span_tag, proxy_made_up_counter" in warned[0]

    asyncio.run(main())
