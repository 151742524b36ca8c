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


PYTHON_BUILD = ROOT / "examples" / "component-python" / "build.py"


@pytest.fixture(scope="module")
def python_component() -> Path:
    """The componentize-py example, built once (cached in examples/component-python/build/)."""
    pytest.importorskip("componentize_py", reason="componentize-py (pyproject's build extra) is not installed")
    proc = subprocess.run([sys.executable, str(PYTHON_BUILD)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip())


def test_python_component_counts_in_shared_data(rig: hosting.FilterRig, python_component: Path) -> None:
    plugin = rig.load(str(python_component), config={"key": "n"}, name="py", vm_id="shared",
                      environment={"GREETING": "hi"})
    rig.shared_data.set("shared", b"n", b"41", 0)
    ex = rig.request(plugin)
    assert ex.request_headers.get("x-python-count") == "42"
    assert rh(ex).get("x-python") == "hi"
    assert rig.shared_data.get("shared", b"n") is not None


def test_python_component_gets_the_restricted_wasi(python_component: Path) -> None:
    runtime = abi.Runtime()
    logs: list[str] = []

    class Host:
        def http_call(self, *args: object) -> bool:
            return False

        def call_later(self, delay_s: float, callback: object) -> object:
            return None

        def log(self, plugin: str, level: abi.LogLevel, message: str) -> None:
            logs.append(message)

    spec = abi.PluginSpec(name="py", module_path=python_component, configuration=b'{"probe": "yes"}',
                          environment={"ONLY_THIS": "1"})
    runtime.load(spec, Host())
    assert "configured: counting in 'requests'" in logs  # stdout lands in the filter's log
    assert any(line.startswith("probe files: denied") for line in logs), logs
    assert any(line.startswith("probe network: denied") for line in logs), logs
    assert "probe environment: ['ONLY_THIS']" in logs
    assert "probe clock: ok" in logs and "probe random: ok" in logs
