"""The component half of the fast-call layer, through both of its paths: the compiled
`_component_call` and the pure-Python fallback (`fastcall_component` without it). Real components
from tests/fixtures/components/build; each test runs once per path and both must agree."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hosting import Recorder

from sluice import abi
from sluice.abi import FailurePolicy, FilterStatus, HeaderMap, LogLevel, PluginSpec, StreamInfo
from sluice.abi import fastcall_component as fc
from sluice.abi.shared import InMemorySharedData

BUILD = Path(__file__).resolve().parent / "fixtures" / "components" / "build"


class Host:
    def __init__(self) -> None:
        self.logs: list[tuple[LogLevel, str]] = []
        self.timers: list[Any] = []

    def http_call(self, *args: Any) -> bool:
        return False

    def call_later(self, delay_s: float, callback: Any) -> Any:
        self.timers.append(callback)
        return self

    def cancel(self) -> None:
        pass

    def log(self, plugin: str, level: LogLevel, message: str) -> None:
        self.logs.append((level, message))


@pytest.fixture(params=["compiled", "python"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Which path of the fast-call layer the plugins loaded in the test use."""
    if request.param == "compiled":
        if not fc.native():
            pytest.skip("sluice/abi/_component_call was not built (no C compiler at install)")
    else:
        monkeypatch.setattr(fc, "_native", None)
    yield request.param


def load(name: str, runtime: abi.Runtime | None = None, **kw: Any) -> tuple[Any, Host]:
    host = Host()
    spec = PluginSpec(name=name, module_path=BUILD / f"{name}.wasm", **kw)
    return (runtime or abi.Runtime()).load(spec, host), host


def test_the_path_fixture_switches_the_layer(path: str) -> None:
    assert fc.native() is (path == "compiled")


def test_header_names_and_values_make_a_round_trip(path: str) -> None:
    plugin, _ = load("echo")
    sent = [(":method", "GET"), (":path", "/ümlaut?q=✓"), ("empty", ""), ("x-emoji", "🦀 crab"),
            ("x-raw", b"caf\xe9".decode("utf-8", "surrogateescape"))]
    sent += [(f"x-many-{i}", "v" * (i % 40)) for i in range(300)]  # grows every buffer on the way
    headers = HeaderMap(sent)
    stream = plugin.new_stream(StreamInfo(), Recorder())
    assert stream.request_headers(headers, True) is FilterStatus.CONTINUE
    stream.complete()
    items = headers.items()
    expected = [(n, "caf\ufffd") if n == "x-raw" else (n, v) for n, v in sent]
    # `add` appends each header as one more value: the original, then its echo.
    assert sorted(items) == sorted(sent + expected)
    assert plugin.report().counters.traps == 0


def test_delete_answers_ok_then_not_found(path: str) -> None:
    runtime = abi.Runtime()
    runtime.shared_data.set("echo", b"k", b"v", 0)
    plugin, _ = load("echo", runtime, vm_id="echo")
    answers = []
    for _ in range(2):
        stream = plugin.new_stream(StreamInfo(), Recorder())
        response = HeaderMap([(":status", "200")])
        assert stream.response_headers(response, True) is FilterStatus.CONTINUE
        answers.append(response.get("x-deleted"))
        stream.complete()
    assert answers == ["ok", "1"]  # 1: the `not-found` case
    assert runtime.shared_data.get("echo", b"k") is None


def test_counter_shares_data_and_logs_through_both_paths(path: str) -> None:
    runtime = abi.Runtime()
    runtime.shared_data.set("c", b"hits", b"9", 0)
    plugin, host = load("counter", runtime, vm_id="c")
    seen = []
    for _ in range(3):
        stream = plugin.new_stream(StreamInfo(), Recorder())
        headers = HeaderMap([(":method", "GET"), (":path", "/")])
        stream.request_headers(headers, True)
        response = HeaderMap([(":status", "200")])
        stream.response_headers(response, True)
        stream.complete()
        seen.append((headers.get("x-component-hits"), response.get("x-component")))
    assert seen == [("10", "counter"), ("11", "counter"), ("12", "counter")]
    assert [m for _, m in host.logs] == ["counter: hits=10", "counter: hits=11", "counter: hits=12"]
    assert (runtime.shared_data.get("c", b"hits") or (b"", 0))[0] == b"12"


def test_replies_and_callouts_are_lifted_alike(path: str) -> None:
    plugin, _ = load("actions")
    rec = Recorder()
    stream = plugin.new_stream(StreamInfo(), rec)
    assert stream.request_headers(HeaderMap([(":path", "/reply")]), True) is FilterStatus.STOP
    stream.complete()
    reply = rec.replies[0]
    assert (reply.status, reply.body, reply.headers, reply.details) == (
        418, b"teapot", (("x-reply", "yes"),), "component_reply")
    rec = Recorder()
    stream = plugin.new_stream(StreamInfo(), rec)
    assert stream.request_headers(HeaderMap([(":path", "/callout")]), True) is FilterStatus.STOP
    stream.complete()
    assert (rec.replies[0].status, rec.replies[0].body) == (502, b"callout failed")


class FailingStore(InMemorySharedData):
    """The real in-memory store, except that reads fail (a broken backend)."""

    def get(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        raise RuntimeError("backend down")


def test_a_failing_host_function_traps_only_its_stream(path: str) -> None:
    plugin, host = load("counter", abi.Runtime(shared_data=FailingStore()), failure_policy=FailurePolicy.FAIL_OPEN)
    headers = HeaderMap([(":method", "GET"), (":path", "/")])
    stream = plugin.new_stream(StreamInfo(), Recorder())
    assert stream.request_headers(headers, True) is FilterStatus.CONTINUE  # fail_open
    stream.complete()
    report = plugin.report()
    assert report.counters.traps == 1 and report.counters.fail_open == 1
    assert "x-component-hits" not in headers
    error = report.last_error or ""
    assert "sluice:filter/shared-data@0.1.0#get failed: RuntimeError: backend down" in error
    assert len(host.timers) == 1  # the replacement instance, built from a timer
