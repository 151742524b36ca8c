"""A VM that is released (plugin retired, or replaced by the `reload` policy) is freed at once by
reference counting, not left for the cycle collector."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from hosting import FilterRig

from sluice import abi

ROOT = Path(__file__).resolve().parent.parent
HEADERS = ROOT / "tests" / "fixtures" / "as" / "build" / "headers.wasm"

# Traps in request headers when the path is /trap; otherwise continues.
TRAPPER = r"""
(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) ":path")
  (global $heap (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get 0)))
    (local.get $p))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $get (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 64) (i32.const 68)))
    ;; "/trap": the value starts with '/' 't'
    (if (i32.eq (i32.load8_u offset=1 (i32.load (i32.const 64))) (i32.const 116)) (then unreachable))
    (i32.const 0)))
"""


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_retired_plugin_frees_its_vm_without_the_collector(no_gc: None) -> None:
    with FilterRig() as rig:
        plugin = rig.load(HEADERS, config={})
        rig.request(plugin)
        vm = weakref.ref(plugin._vm)  # type: ignore[arg-type]
        plugin.retire()
        assert vm() is None
        assert plugin.report().vm_count == 0 and plugin.report().memory_bytes == 0
        # A stream started after retirement gets the failure policy, not a dead VM.
        assert rig.request(plugin).status == 503


def test_vm_replaced_by_the_reload_policy_is_freed(tmp_path: Path, no_gc: None) -> None:
    module = tmp_path / "trapper.wasm"
    module.write_bytes(wasmtime.wat2wasm(TRAPPER))
    with FilterRig() as rig:
        plugin = rig.load(module, failure_policy=abi.FailurePolicy.RELOAD)
        first = weakref.ref(plugin._vm)  # type: ignore[arg-type]
        assert rig.request(plugin, path="/trap").status == 503
        assert plugin.report().counters.reloads == 1
        assert first() is None  # the trapped VM had no other stream: freed at once
        assert rig.request(plugin, path="/ok").status == 200
        assert plugin.report().vm_count == 1
