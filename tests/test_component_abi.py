"""Component filters at the abi level: recognition, load errors, shared data semantics, failure
policies, the on-disk cache (real components from tests/fixtures/components/build)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hosting import Recorder

from sluice import abi
from sluice.abi import (
    FailurePolicy,
    FilterStatus,
    HeaderMap,
    LogLevel,
    PluginLoadError,
    PluginSpec,
    PluginState,
    StreamInfo,
)

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "tests" / "fixtures" / "components" / "build"


class Timer:
    def __init__(self, delay_s: float, callback: Callable[[], None]) -> None:
        self.delay_s, self.callback, self.cancelled = delay_s, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Host:
    def __init__(self) -> None:
        self.logs: list[tuple[LogLevel, str]] = []
        self.timers: list[Timer] = []

    def http_call(self, *args: Any) -> bool:
        return False

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        self.timers.append(Timer(delay_s, callback))
        return self.timers[-1]

    def run_timers(self) -> None:
        """What the event loop would do: run the timers set so far (the instance replacement)."""
        timers, self.timers = self.timers, []
        for timer in timers:
            if not timer.cancelled:
                timer.callback()

    def log(self, plugin: str, level: LogLevel, message: str) -> None:
        self.logs.append((level, message))


def request() -> HeaderMap:
    return HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "x"), ("user-agent", "t")])


def load(runtime: abi.Runtime, name: str, **kw: Any) -> tuple[Any, Host]:
    host = Host()
    spec = PluginSpec(name=name, module_path=BUILD / f"{name}.wasm", **kw)
    return runtime.load(spec, host), host


def test_a_component_is_recognised_from_its_binary(tmp_path: Path) -> None:
    runtime = abi.Runtime(cache_dir=tmp_path)
    compiled = runtime.compile(BUILD / "counter.wasm")
    assert compiled.abi_version == "component sluice:filter@0.1.0"
    assert not compiled.from_cache
    again = abi.Runtime(cache_dir=tmp_path).compile(BUILD / "counter.wasm")
    assert again.from_cache and again.sha256 == compiled.sha256


def test_a_component_of_another_world_is_refused_with_the_reason(tmp_path: Path) -> None:
    other = tmp_path / "other.wasm"
    # An empty component (just the header): valid, but exports nothing of the world.
    other.write_bytes(bytes.fromhex("0061736d0d000100"))
    with pytest.raises(PluginLoadError, match="not a sluice:filter/filter@0.1.0 filter.*configure"):
        abi.Runtime().compile(other)


def test_configure_errors_reject_the_filter_with_the_guest_message() -> None:
    with pytest.raises(PluginLoadError, match="configure rejected the configuration: configuration rejected"):
        load(abi.Runtime(), "counter", configuration=b'"reject"')


def test_shared_data_is_the_runtime_store_with_vm_id_namespaces() -> None:
    runtime = abi.Runtime()
    runtime.shared_data.set("mine", b"hits", b"41", 0)
    runtime.shared_data.set("other", b"hits", b"7", 0)
    plugin, host = load(runtime, "counter", vm_id="mine")
    headers = request()
    stream = plugin.new_stream(StreamInfo(), Recorder())
    assert stream.request_headers(headers, True) is FilterStatus.CONTINUE
    stream.complete()
    assert headers.get("x-component-hits") == "42"
    value, cas = runtime.shared_data.get("mine", b"hits") or (b"", 0)
    assert value == b"42" and cas != 0
    assert runtime.shared_data.get("other", b"hits") == (b"7", 2)
    assert (LogLevel.INFO, "counter: hits=42") in host.logs


def test_the_log_level_filters_guest_logs() -> None:
    plugin, host = load(abi.Runtime(), "counter", log_level=LogLevel.WARN)
    stream = plugin.new_stream(StreamInfo(), Recorder())
    stream.request_headers(request(), True)
    stream.complete()
    assert host.logs == []


def test_a_value_that_is_not_utf8_traps_the_guest_and_fails_only_that_stream() -> None:
    runtime = abi.Runtime()
    runtime.shared_data.set("v", b"hits", b"\xff", 0)
    plugin, host = load(runtime, "counter", vm_id="v", failure_policy=FailurePolicy.FAIL_OPEN)
    rec = Recorder()
    stream = plugin.new_stream(StreamInfo(), rec)
    assert stream.request_headers(request(), True) is FilterStatus.CONTINUE  # fail_open: skipped
    stream.complete()
    report = plugin.report()
    assert report.counters.traps == 1 and report.counters.fail_open == 1
    assert "unreachable" in (report.last_error or "")
    assert report.state is PluginState.RELOADING and report.counters.reloads == 0
    # The fresh instance is built from a timer, never on a request's path.
    assert [t.delay_s for t in host.timers] == [0.0]
    host.run_timers()
    assert plugin.report().state is PluginState.OK
    runtime.shared_data.set("v", b"hits", b"1", 0)
    stream = plugin.new_stream(StreamInfo(), Recorder())
    headers = request()
    stream.request_headers(headers, True)  # the fresh instance
    stream.complete()
    assert headers.get("x-component-hits") == "2"
    assert plugin.report().counters.reloads == 1


def test_fail_closed_answers_503_and_the_response_path_skips_the_filter() -> None:
    plugin, _ = load(abi.Runtime(), "actions")
    rec = Recorder()
    stream = plugin.new_stream(StreamInfo(), rec)
    headers = HeaderMap([(":method", "GET"), (":path", "/trap")])
    assert stream.request_headers(headers, True) is FilterStatus.STOP
    assert rec.events == ["local_reply"] and rec.replies[0].status == 503
    response = HeaderMap([(":status", "200")])
    assert stream.response_headers(response, True) is FilterStatus.CONTINUE
    assert "x-actions" not in response
    stream.complete()


def test_local_reply_and_unknown_callout_cluster() -> None:
    plugin, host = load(abi.Runtime(), "actions")
    rec = Recorder()
    stream = plugin.new_stream(StreamInfo(), rec)
    assert stream.request_headers(HeaderMap([(":path", "/reply")]), True) is FilterStatus.STOP
    reply = rec.replies[0]
    assert (reply.status, reply.body, reply.headers) == (418, b"teapot", (("x-reply", "yes"),))
    stream.complete()
    # The host refuses the callout (unknown cluster): on-callout-response(none) answers 502.
    rec = Recorder()
    stream = plugin.new_stream(StreamInfo(), rec)
    assert stream.request_headers(HeaderMap([(":path", "/callout")]), True) is FilterStatus.STOP
    assert rec.replies[0].status == 502 and rec.replies[0].body == b"callout failed"
    stream.complete()
    assert plugin.report().active_streams == 0


def test_retire_releases_the_instance_after_the_last_stream() -> None:
    plugin, _ = load(abi.Runtime(), "counter")
    stream = plugin.new_stream(StreamInfo(), Recorder())
    plugin.retire()
    assert plugin.report().vm_count == 1
    stream.request_headers(request(), True)
    stream.complete()
    assert plugin.report().vm_count == 0
    assert plugin.report().state.value == "retired"


def test_a_retired_plugin_builds_no_replacement() -> None:
    plugin, host = load(abi.Runtime(), "actions")
    stream = plugin.new_stream(StreamInfo(), Recorder())
    assert stream.request_headers(HeaderMap([(":method", "GET"), (":path", "/trap")]), True) is FilterStatus.STOP
    stream.complete()
    [timer] = host.timers
    # Until the replacement is built, new streams get the failure policy (here fail_closed).
    rec = Recorder()
    stream = plugin.new_stream(StreamInfo(), rec)
    assert stream.request_headers(request(), True) is FilterStatus.STOP and rec.replies[0].status == 503
    stream.complete()
    plugin.retire()
    assert timer.cancelled
    host.run_timers()
    report = plugin.report()
    assert report.state is PluginState.RETIRED and report.counters.reloads == 0 and report.vm_count == 0
