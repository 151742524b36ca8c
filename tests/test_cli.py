from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import pytest

from sluice import BUILTIN_FILTERS_DIR
from sluice.proxy.cli import build_parser, main
from sluice.proxy.config import SluiceConfig

REPO = Path(__file__).resolve().parent.parent
FILTERS = BUILTIN_FILTERS_DIR

GOOD = """\
listen: 127.0.0.1:8080
clusters:
  web: {endpoints: ["127.0.0.1:9001"]}
routes:
  - {match: {prefix: /}, cluster: web}
"""


def sluice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sluice.proxy", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def write(tmp_path: Path, text: str, name: str = "sluice.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- sluice check ------------------------------------------------------------------------------------


def test_check_good_config_without_filters(tmp_path: Path) -> None:
    result = sluice("check", "-c", str(write(tmp_path, GOOD)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "config OK: 0 filters, 1 routes, 1 clusters\n"
    assert result.stderr == ""


def test_check_bad_config_prints_every_error(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        GOOD.replace("prefix: /}, cluster: web}", "prefix: /}, cluster: nope}")
        + "chain:\n  - name: a\n    module: a.wasm\n    failure_policy: explode\n    colour: red\n",
    )
    result = sluice("check", "-c", str(config))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{config}:5: routes[0].cluster: unknown cluster 'nope' (clusters: web)",
        f"{config}:9: chain[0].failure_policy: must be one of fail_closed, fail_open, reload (got 'explode')",
        f"{config}:10: chain[0].colour: unknown key 'colour' (allowed: name, module, config, failure_policy, "
        "vm_id, root_id, vm_config, memory_limit, cpu_deadline_ms, match, log_level, environment, "
        "strict_imports, capabilities, limits)",
    ]


def test_check_yaml_syntax_error(tmp_path: Path) -> None:
    config = write(tmp_path, "listen: 127.0.0.1:8080\nclusters:\n  web: {endpoints: [}\n")
    result = sluice("check", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{config}:3: YAML syntax error: ")


def test_check_missing_file(tmp_path: Path) -> None:
    result = sluice("check", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{tmp_path / 'nope.yaml'}: cannot read config")


def test_check_reports_a_module_that_does_not_load(tmp_path: Path) -> None:
    (tmp_path / "filters").mkdir()
    (tmp_path / "filters" / "junk.wasm").write_bytes(b"not wasm at all")
    config = write(
        tmp_path,
        GOOD + "chain:\n  - name: junk\n    module: junk.wasm\n  - name: gone\n    module: missing.wasm\n",
    )
    result = sluice("check", "-c", str(config))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{config}:7: chain[0] (junk): {tmp_path / 'filters' / 'junk.wasm'}: ")
    assert "not a WebAssembly module" in lines[0]
    assert lines[1].startswith(f"{config}:9: chain[1] (gone): {tmp_path / 'filters' / 'missing.wasm'}: ")
    assert lines[-1] == f"{config}: 2 of 2 filters failed to load"


def _need(*modules: str) -> None:
    missing = [m for m in modules if not (FILTERS / m).is_file()]
    if missing:
        pytest.skip(f"filters not built: {', '.join(missing)} (run sluice/filters/build.py)")


def test_check_default_config_loads_the_real_filters() -> None:
    _need("auth.wasm", "ratelimit.wasm", "ab.wasm")
    result = sluice("check", "-c", "sluice/config/sluice.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "config OK: 3 filters, 2 routes, 2 clusters\n"


def test_check_real_filter_rejecting_its_config(tmp_path: Path) -> None:
    _need("auth.wasm")
    config = write(
        tmp_path,
        f"{GOOD}filters_dir: {FILTERS}\nchain:\n  - name: ok\n    module: auth.wasm\n"
        '    config: {api_keys: ["k"]}\n  - name: auth\n    module: auth.wasm\n    config: {}\n',
    )
    result = sluice("check", "-c", str(config))
    assert result.returncode == 1
    failures = [line for line in result.stderr.splitlines() if " chain[" in line]
    assert len(failures) == 1
    assert failures[0].startswith(f"{config}:11: chain[1] (auth): {FILTERS / 'auth.wasm'}: ")
    # The filter's own explanation arrives through Host.log.
    assert "[auth] " in result.stderr


# -- main() in process -------------------------------------------------------------------------------


def test_usage_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["filter"]) == 2
    assert main(["filter", "test", "x.wasm", "-H", "no colon"]) == 2
    assert "expected 'NAME: VALUE'" in capsys.readouterr().err
    assert main(["filter", "test", "x.wasm", "--upstream", "api=nohost"]) == 2
    assert main(["--help"]) == 0
    assert "check" in capsys.readouterr().out


def test_run_with_a_bad_config_does_not_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, "listen: nowhere\n")
    assert main(["run", "-c", str(config)]) == 1
    assert (
        capsys.readouterr().err
        == f"{config}:1: listen: expected host:port, e.g. 127.0.0.1:8080 (got 'nowhere')\n"
    )


def test_run_hands_the_config_to_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[SluiceConfig] = []

    def serve(config: SluiceConfig) -> int:
        served.append(config)
        return 7

    monkeypatch.setitem(sys.modules, "sluice.proxy.app", types.SimpleNamespace(serve=serve))
    config = write(tmp_path, GOOD)
    assert main(["run", "-c", str(config)]) == 7
    assert len(served) == 1 and served[0].source_path == config.resolve()


def test_filter_test_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[argparse.Namespace] = []

    def filter_test_main(args: argparse.Namespace) -> int:
        seen.append(args)
        return 3

    monkeypatch.setitem(sys.modules, "sluice.proxy.filtertest", types.SimpleNamespace(main=filter_test_main))
    argv = [
        "filter", "test", "auth.wasm",
        "--config", '{"api_keys": ["k"]}',
        "--method", "POST",
        "--path", "/x?y=1",
        "-H", "X-Api-Key: k",
        "--header", "x-b: 1:2",
        "--body", "hello",
        "--response-status", "201",
        "--response-header", "content-type: text/plain",
        "--response-body", "done",
        "--upstream", "authz=127.0.0.1:9100",
        "--upstream", "v6=[::1]:80",
    ]  # fmt: skip
    assert main(argv) == 3
    args = seen[0]
    assert args.module == "auth.wasm"
    assert args.config == '{"api_keys": ["k"]}'
    assert (args.method, args.path, args.body) == ("POST", "/x?y=1", "hello")
    # Passed on as written; sluice.proxy.filtertest parses them.
    assert args.header == ["X-Api-Key: k", "x-b: 1:2"]
    assert (args.response_status, args.response_header, args.response_body) == (
        201,
        ["content-type: text/plain"],
        "done",
    )
    assert args.upstream == ["authz=127.0.0.1:9100", "v6=[::1]:80"]


def test_filter_test_defaults() -> None:
    args = build_parser().parse_args(["filter", "test", "m.wasm"])
    assert (args.config, args.method, args.path, args.body, args.response_status, args.response_body) == (
        None,
        "GET",
        "/",
        None,
        200,
        None,
    )
    assert (args.header, args.response_header, args.upstream) == ([], [], [])


def test_filter_test_runs_a_real_filter() -> None:
    _need("auth.wasm")
    result = sluice(
        "filter", "test", "sluice/filters/auth.wasm", "--config", '{"api_keys": ["k"]}', "-H", "x-api-key: k"
    )
    assert result.returncode == 0, result.stderr
    assert "x-auth-subject" in result.stdout
