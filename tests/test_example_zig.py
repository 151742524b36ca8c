"""examples/zig-filter: the "write your own filter in Zig" example, and the committed builds."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hosting
import pytest
from hosting import rh

from sluice import BUILTIN_FILTERS_DIR, abi

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "zig-filter" / "add_header.wasm"




@pytest.fixture
def rig() -> Iterator[hosting.FilterRig]:
    with hosting.FilterRig() as r:
        yield r


def test_example_adds_the_configured_response_header(rig: hosting.FilterRig) -> None:
    plugin = rig.load(str(EXAMPLE), config={"name": "X-Hello", "value": "world"}, name="add_header")
    ex = rig.request(plugin, response_headers=[("x-hello", "old"), ("content-type", "text/plain")])
    assert ex.local_reply is None
    assert rh(ex).get_all("x-hello") == ["world"]
    assert rh(ex).get("content-type") == "text/plain"
    assert "x-hello" not in ex.request_headers


def test_example_bad_config(rig: hosting.FilterRig) -> None:
    with pytest.raises(abi.PluginLoadError):
        rig.load(str(EXAMPLE), config={"value": "world"}, name="add_header")
    assert (
        "add_header",
        abi.LogLevel.ERROR,
        'add_header: invalid configuration: "name" is required',
    ) in rig.logs
    with pytest.raises(abi.PluginLoadError):
        rig.load(str(EXAMPLE), config={"name": "x", "colour": "red"}, name="add_header")
    assert rig.logs[-1][2].endswith('unknown key "colour"') or any(
        'unknown key "colour"' in m for _, _, m in rig.logs
    )


@pytest.mark.parametrize("name", ["auth", "ratelimit", "ab", "add_header"])
def test_filters_are_small_reactors(name: str) -> None:
    import wasmtime

    path = EXAMPLE if name == "add_header" else BUILTIN_FILTERS_DIR / f"{name}.wasm"
    assert path.stat().st_size < 100 * 1024
    module = wasmtime.Module.from_file(wasmtime.Engine(), str(path))
    exports = {e.name for e in module.exports}
    assert {
        "proxy_abi_version_0_2_1",
        "proxy_on_memory_allocate",
        "proxy_on_context_create",
        "memory",
    } <= exports
    assert "_start" not in exports
    modules = {i.module for i in module.imports}
    assert modules <= {"env", "wasi_snapshot_preview1"}


@pytest.mark.skipif(
    importlib.util.find_spec("ziglang") is None, reason="ziglang (pip install .[build]) not installed"
)
def test_committed_wasm_files_are_reproducible() -> None:
    proc = subprocess.run(
        [sys.executable, str(BUILTIN_FILTERS_DIR / "build.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
