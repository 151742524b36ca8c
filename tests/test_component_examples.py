"""The component examples (examples/component-zig), run like any filter through the rig that
`sluice filter test` uses, and their committed builds."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hosting
import pytest
from hosting import rh

from sluice import abi

ROOT = Path(__file__).resolve().parent.parent
ZIG = ROOT / "examples" / "component-zig" / "tag.wasm"


@pytest.fixture
def rig() -> Iterator[hosting.FilterRig]:
    with hosting.FilterRig() as r:
        yield r


def test_zig_component_tags_requests_and_responses(rig: hosting.FilterRig) -> None:
    plugin = rig.load(str(ZIG), config={"header": "x-tag", "value": "blue", "deny_prefix": "/admin"}, name="tag")
    assert plugin.report().module.abi_version == "component sluice:filter@0.1.0"
    ex = rig.request(plugin, path="/api", headers=[("x-tag", "old")])
    assert ex.local_reply is None
    assert ex.request_headers.get_all("x-tag") == ["blue"]
    assert rh(ex).get("x-tagged-by") == "zig-component"


def test_zig_component_denies_by_path_prefix(rig: hosting.FilterRig) -> None:
    plugin = rig.load(str(ZIG), config={"header": "x-tag", "value": "blue", "deny_prefix": "/admin"}, name="tag")
    ex = rig.request(plugin, path="/admin/users")
    assert ex.local_reply is not None
    assert (ex.local_reply.status, ex.local_reply.body) == (403, b"forbidden\n")


def test_zig_component_rejects_a_bad_configuration(rig: hosting.FilterRig) -> None:
    with pytest.raises(abi.PluginLoadError, match='configure rejected the configuration: configuration must be'):
        rig.load(str(ZIG), config={"value": "blue"}, name="tag")
    with pytest.raises(abi.PluginLoadError, match='"header" must not be empty'):
        rig.load(str(ZIG), config={"header": "", "value": "blue"}, name="tag")


def test_sluice_filter_test_runs_a_component(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sluice.proxy", "filter", "test", str(ZIG), "--config",
         '{"header": "x-tag", "value": "green"}'],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "x-tag" in proc.stdout and "green" in proc.stdout


def test_zig_component_build_is_reproducible() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "component-zig" / "build.py"), "--check"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
