"""Failure policy (reference 6.4): traps in every callback, runaway loops, proc_exit, reloads.

One hand-written module (fixtures/wat/failure.wat) fails wherever it is told to: the VM
configuration selects a load-time callback, the plugin configuration selects a stream callback,
and only requests for `/trap` are affected, so the next request on the same VM shows whether the
VM kept serving.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from hosting import FilterRig, Recorder

from sluice import abi
from sluice.abi import FailurePolicy, FilterStatus, HeaderMap, LogLevel, PluginState

WAT = Path(__file__).resolve().parent / "fixtures" / "wat" / "failure.wat"

STREAM_CALLBACKS = [
    "context_create", "request_headers", "request_body", "request_trailers",
    "response_headers", "response_body", "response_trailers", "log", "done", "delete",
]
AFTER_RESPONSE = {"log", "done", "delete"}
"""Callbacks that run once the response is complete: a trap there cannot change the response."""


@pytest.fixture(scope="module")
def wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wat") / "failure.wasm"
    out.write_bytes(wasmtime.wat2wasm(WAT.read_text()))
    return out


@pytest.fixture
def rig() -> Iterator[FilterRig]:
    with FilterRig(clusters={"dead": f"127.0.0.1:{_closed_port()}"}) as r:
        yield r


def _closed_port() -> int:
    """A local port nobody listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drive(plugin: abi.Plugin, path: str) -> tuple[Recorder, dict[str, FilterStatus]]:
    """Every phase of one stream, trailers included, stopping at a local reply."""
    events = Recorder()
    request = HeaderMap([(":method", "POST"), (":path", path), (":authority", "example.com")])
    info = abi.StreamInfo(request_headers=request)
    stream = plugin.new_stream(info, events)
    statuses: dict[str, FilterStatus] = {}
    try:
        steps = [
            ("request_headers", lambda: stream.request_headers(request, False)),
            ("request_body", lambda: stream.request_body(bytearray(b"payload"), False)),
            ("request_trailers", lambda: stream.request_trailers(HeaderMap([("x-t", "1")]))),
            ("response_headers", lambda: stream.response_headers(HeaderMap([(":status", "200")]), False)),
            ("response_body", lambda: stream.response_body(bytearray(b"answer"), False)),
            ("response_trailers", lambda: stream.response_trailers(HeaderMap([("x-r", "1")]))),
        ]
        for name, step in steps:
            statuses[name] = step()
            if events.replies:
                break
    finally:
        stream.complete()
    return events, statuses


def load(rig: FilterRig, wasm: Path, mode: str = "", policy: FailurePolicy = FailurePolicy.FAIL_CLOSED,
         **spec: object) -> abi.Plugin:
    return rig.load(wasm, mode.encode(), failure_policy=policy, **spec)


def starts(rig: FilterRig) -> int:
    return sum(1 for _, _, msg in rig.logs if msg == "vm_start")


def settle(rig: FilterRig, plugin: abi.Plugin, timeout_s: float = 5.0) -> None:
    """Run the loop until the plugin has tried once more to build the replacement VM it scheduled
    (off the request path, after its backoff)."""
    counters = plugin.report().counters
    target = counters.reloads + counters.reload_failures + 1
    deadline = time.monotonic() + timeout_s
    while True:
        counters = plugin.report().counters
        if counters.reloads + counters.reload_failures >= target:
            return
        assert time.monotonic() < deadline, "the scheduled VM replacement never ran"
        rig.run_for(0.001)


def assert_served(events: Recorder, statuses: dict[str, FilterStatus]) -> None:
    assert events.replies == []
    assert all(s is FilterStatus.CONTINUE for s in statuses.values()), statuses
    assert len(statuses) == 6


# -- load time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, callback",
    [("root_context_create", "proxy_on_context_create"), ("vm_start", "proxy_on_vm_start"),
     ("configure", "proxy_on_configure")],
)
def test_trap_at_load_time_is_a_load_error_naming_the_callback(
    rig: FilterRig, wasm: Path, where: str, callback: str
) -> None:
    with pytest.raises(abi.PluginLoadError) as err:
        rig.load(wasm, b"", vm_configuration=where.encode())
    assert err.value.path == str(wasm)
    assert f"trapped in {callback}" in err.value.reason
    assert "unreachable" in err.value.reason


def test_the_module_loads_and_serves_when_told_nothing(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm)
    assert_served(*drive(plugin, "/trap"))
    assert plugin.report().counters.traps == 0 and plugin.report().last_error is None
    assert starts(rig) == 1
    assert ("filter", LogLevel.INFO, "configure ") in rig.logs


# -- stream callbacks, by policy -----------------------------------------------------------------


@pytest.mark.parametrize("callback", STREAM_CALLBACKS)
def test_fail_closed_fails_only_the_trapping_stream(rig: FilterRig, wasm: Path, callback: str) -> None:
    plugin = load(rig, wasm, callback)
    vm = plugin._vm
    events, statuses = drive(plugin, "/trap")
    assert plugin.report().counters.traps == 1
    assert plugin.report().last_error is not None and f"trapped in proxy_on_{callback}" in plugin.report().last_error
    assert any(level is LogLevel.ERROR and f"proxy_on_{callback}" in msg for _, level, msg in rig.logs)
    if callback in AFTER_RESPONSE:
        assert_served(events, statuses)  # the response was already complete
        assert plugin.report().counters.fail_closed == 0
    else:
        assert len(events.replies) == 1
        reply = events.replies[0]
        assert reply.status == 503 and reply.details == "wasm_fail_stream"
        assert plugin.report().counters.fail_closed == 1
        assert list(statuses.values())[-1] is FilterStatus.STOP
    # The VM keeps serving: the next request goes through the same VM untouched.
    assert_served(*drive(plugin, "/ok"))
    assert plugin._vm is vm and plugin.report().counters.reloads == 0 and plugin.report().state is PluginState.OK
    assert plugin.report().counters.traps == 1 and starts(rig) == 1


@pytest.mark.parametrize("callback", [c for c in STREAM_CALLBACKS if c not in AFTER_RESPONSE])
def test_fail_open_skips_the_filter_for_the_trapping_stream(
    rig: FilterRig, wasm: Path, callback: str
) -> None:
    plugin = load(rig, wasm, callback, FailurePolicy.FAIL_OPEN)
    events, statuses = drive(plugin, "/trap")
    assert events.replies == []
    assert all(s is FilterStatus.CONTINUE for s in statuses.values()), statuses
    assert len(statuses) == 6  # every phase went on
    counters = plugin.report().counters
    assert counters.traps == 1 and counters.fail_open == 1 and counters.fail_closed == 0
    assert_served(*drive(plugin, "/ok"))
    assert plugin.report().counters.reloads == 0


def test_fail_open_through_the_rig(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, "request_headers", FailurePolicy.FAIL_OPEN)
    ex = rig.request(plugin, path="/trap", response_body=b"from upstream")
    assert ex.local_reply is None and ex.status == 200 and ex.response_body == b"from upstream"
    assert plugin.report().counters.fail_open == 1


@pytest.mark.parametrize("callback", STREAM_CALLBACKS)
def test_reload_gives_a_fresh_vm_to_the_next_request(rig: FilterRig, wasm: Path, callback: str) -> None:
    plugin = load(rig, wasm, callback, FailurePolicy.RELOAD)
    old = plugin._vm
    events, _ = drive(plugin, "/trap")
    settle(rig, plugin)
    if callback not in AFTER_RESPONSE:
        assert [r.status for r in events.replies] == [503]
        assert events.replies[0].details == "wasm_fail_stream"
    assert plugin.report().counters.traps == 1 and plugin.report().counters.reloads == 1
    assert plugin._vm is not old
    # A new root context went through create / vm_start / configure again.
    assert starts(rig) == 2
    assert sum(1 for _, _, msg in rig.logs if msg == f"configure {callback}") == 2
    assert_served(*drive(plugin, "/ok"))
    assert plugin.report().vm_count == 1  # the old VM was released once its last stream completed


def test_reload_backs_off_exponentially(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, "request_headers", FailurePolicy.RELOAD, reload_backoff_s=0.5)
    drive(plugin, "/trap")
    settle(rig, plugin)
    assert plugin.report().counters.reloads == 1
    second = plugin._vm
    # A second failure inside the backoff window does not reload at once...
    events, _ = drive(plugin, "/trap")
    assert [r.status for r in events.replies] == [503]
    assert plugin.report().counters.traps == 2 and plugin.report().counters.reloads == 1
    assert plugin.report().state is PluginState.RELOADING and plugin._vm is second
    # ...it is built once the window has passed.
    settle(rig, plugin)
    assert_served(*drive(plugin, "/ok"))
    assert plugin.report().counters.reloads == 2 and plugin._vm is not second
    assert plugin.report().state is PluginState.OK and starts(rig) == 3
    # The window doubled: a third failure right now is again held back.
    drive(plugin, "/trap")
    assert plugin.report().counters.reloads == 2 and plugin.report().state is PluginState.RELOADING


# -- proc_exit, deadlines, root callbacks ----------------------------------------------------------


@pytest.mark.parametrize("policy", [FailurePolicy.FAIL_CLOSED, FailurePolicy.FAIL_OPEN])
def test_proc_exit_ends_the_vm_and_later_requests_get_a_fresh_one(
    rig: FilterRig, wasm: Path, policy: FailurePolicy
) -> None:
    plugin = load(rig, wasm, "exit", policy)
    old = plugin._vm
    assert old is not None
    events, _ = drive(plugin, "/trap")
    assert old.dead == "proc_exit(3)"
    if policy is FailurePolicy.FAIL_CLOSED:
        assert [r.status for r in events.replies] == [503]
    else:
        assert events.replies == []
    assert plugin.report().last_error is not None and "proc_exit(3)" in plugin.report().last_error
    assert ("filter", LogLevel.ERROR, "proc_exit(3)") in rig.logs
    settle(rig, plugin)
    assert_served(*drive(plugin, "/ok"))
    assert plugin._vm is not old and plugin.report().counters.reloads == 1 and starts(rig) == 2


def test_infinite_loop_is_stopped_at_the_cpu_deadline(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, "loop", cpu_deadline_ms=20)
    started = time.monotonic()
    events, _ = drive(plugin, "/trap")
    elapsed = time.monotonic() - started
    assert elapsed < 2.0  # generous: the deadline is 20 ms
    assert plugin.report().counters.deadlines == 1 and plugin.report().counters.traps == 0
    assert plugin.report().counters.fail_closed == 1
    assert [r.status for r in events.replies] == [503]
    assert plugin.report().last_error is not None
    assert "CPU deadline" in plugin.report().last_error and "proxy_on_request_headers" in plugin.report().last_error
    assert_served(*drive(plugin, "/ok"))
    assert plugin.report().counters.deadlines == 1


def test_trap_in_tick_is_counted_and_streams_go_on(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, "tick")
    rig.run_for(0.1)
    assert plugin.report().counters.traps >= 1
    assert plugin.report().last_error is not None and "proxy_on_tick" in plugin.report().last_error
    assert_served(*drive(plugin, "/ok"))


def test_trap_in_http_call_response_fails_the_paused_stream(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, "http_call_response")
    started = time.monotonic()
    ex = rig.request(plugin, path="/trap", wait=10.0)
    assert time.monotonic() - started < 5.0  # failed when the callout answered, not at the rig's wait
    assert ex.local_reply is not None
    assert ex.local_reply.status == 503 and ex.local_reply.details == "wasm_fail_stream"
    assert ex.phases[0].name == "request_headers"
    assert plugin.report().counters.traps == 1 and plugin.report().counters.fail_closed == 1
    assert any(level is LogLevel.ERROR and "trapped in proxy_on_http_call_response" in msg
               for _, level, msg in rig.logs)
    assert plugin.report().last_error is not None
    ok = rig.request(plugin, path="/ok")
    assert ok.local_reply is None and ok.status == 200
    assert plugin.report().active_streams == 0


def test_stats_and_last_error_accumulate(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, "request_body")
    for _ in range(3):
        drive(plugin, "/trap")
        drive(plugin, "/ok")
    stats = plugin.report().counters
    counters = (stats.traps, stats.deadlines, stats.fail_closed, stats.fail_open, stats.reloads)
    assert counters == (3, 0, 3, 0, 0)
    assert stats.streams == 6
    assert plugin.report().last_error is not None
    assert plugin.report().last_error.startswith("trapped in proxy_on_request_body")


# -- failures nested inside host calls, at start-up, and on paused streams ----------------------------


def test_trap_in_the_allocator_during_a_host_call_fails_the_stream(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, "malloc_trap")
    events, _ = drive(plugin, "/trap")
    assert [r.status for r in events.replies] == [503]
    assert plugin.report().counters.traps == 1 and plugin.report().counters.deadlines == 0
    assert plugin.report().last_error is not None
    assert "proxy_on_request_headers" in plugin.report().last_error and "unreachable" in plugin.report().last_error
    assert_served(*drive(plugin, "/ok"))


def test_runaway_allocator_during_a_host_call_hits_the_deadline(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, "malloc_loop", cpu_deadline_ms=20)
    started = time.monotonic()
    events, _ = drive(plugin, "/trap")
    assert time.monotonic() - started < 2.0
    assert [r.status for r in events.replies] == [503]
    assert plugin.report().counters.deadlines == 1 and plugin.report().counters.traps == 0
    assert_served(*drive(plugin, "/ok"))


@pytest.mark.parametrize("policy", [FailurePolicy.FAIL_CLOSED, FailurePolicy.FAIL_OPEN])
def test_trap_in_http_call_response_applies_the_policy_to_the_paused_stream(
    rig: FilterRig, wasm: Path, policy: FailurePolicy
) -> None:
    plugin = load(rig, wasm, "http_call_response", policy)
    ex = rig.request(plugin, path="/trap", wait=10.0)
    if policy is FailurePolicy.FAIL_CLOSED:
        assert ex.local_reply is not None and ex.local_reply.status == 503
    else:
        assert ex.local_reply is None and ex.status == 200
        assert ex.phases[0].status == "stop→resumed"
        assert plugin.report().counters.fail_open == 1


def test_streams_paused_on_a_vm_that_exits_are_failed(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, "exit")

    async def scenario() -> tuple[object, object]:
        paused = asyncio.ensure_future(rig.exchange(plugin, path="/pause", wait=3.0))
        await asyncio.sleep(0.05)  # let it reach its STOP
        assert plugin.report().active_streams == 1
        exiting = await rig.exchange(plugin, path="/trap")
        return await paused, exiting

    started = time.monotonic()
    paused, exiting = rig.loop.run_until_complete(scenario())
    assert exiting.local_reply is not None and exiting.local_reply.status == 503  # type: ignore[attr-defined]
    # The stream paused on the dead VM can never be resumed by it: it must be failed, not left
    # waiting for a continue that cannot come.
    assert time.monotonic() - started < 2.5
    assert paused.local_reply is not None and paused.local_reply.status == 503  # type: ignore[attr-defined]


def test_start_function_that_never_returns_fails_the_load(rig: FilterRig, tmp_path: Path) -> None:
    wasm = tmp_path / "spin_start.wasm"
    wasm.write_bytes(wasmtime.wat2wasm((WAT.parent / "spin_start.wat").read_text()))
    started = time.monotonic()
    with pytest.raises(abi.PluginLoadError) as err:
        rig.load(wasm, cpu_deadline_ms=20)
    assert time.monotonic() - started < 10.0  # start-up gets a longer, but still finite, budget
    assert "deadline" in err.value.reason or "interrupt" in err.value.reason


# -- reloads that fail -------------------------------------------------------------------------------


def test_failed_reload_is_counted_and_retried_after_the_backoff(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, "request_headers", FailurePolicy.RELOAD, reload_backoff_s=0.3)
    rig.shared_data.set("filter", b"refuse_start", b"1", 0)
    events, _ = drive(plugin, "/trap")
    settle(rig, plugin)
    assert [r.status for r in events.replies] == [503]
    assert plugin.report().counters.reload_failures == 1 and plugin.report().counters.reloads == 0
    assert plugin.report().last_error is not None and plugin.report().last_error.startswith("reload failed")
    assert "proxy_on_vm_start" in plugin.report().last_error
    assert plugin.report().state is PluginState.RELOADING
    rig.shared_data.delete("filter", b"refuse_start", 0)
    settle(rig, plugin)
    assert_served(*drive(plugin, "/ok"))
    assert plugin.report().counters.reloads == 1 and plugin.report().state is PluginState.OK


@pytest.mark.parametrize("policy", [FailurePolicy.FAIL_CLOSED, FailurePolicy.FAIL_OPEN])
def test_dead_vm_without_a_replacement_applies_the_policy_to_new_streams(
    rig: FilterRig, wasm: Path, policy: FailurePolicy
) -> None:
    plugin = load(rig, wasm, "exit", policy, reload_backoff_s=0.3)
    rig.shared_data.set("filter", b"refuse_start", b"1", 0)
    drive(plugin, "/trap")
    settle(rig, plugin)
    assert plugin.report().counters.reload_failures == 1 and plugin.report().state is PluginState.FAILED
    events, statuses = drive(plugin, "/ok")
    if policy is FailurePolicy.FAIL_CLOSED:
        assert [r.status for r in events.replies] == [503]
        assert events.replies[0].details == "wasm_fail_stream"
        assert plugin.report().counters.fail_closed == 2
    else:
        assert_served(events, statuses)
        assert plugin.report().counters.fail_open == 2
    rig.shared_data.delete("filter", b"refuse_start", 0)
    settle(rig, plugin)
    assert_served(*drive(plugin, "/ok"))
    assert plugin.report().counters.reloads == 1 and plugin.report().state is PluginState.OK


def test_trapping_tick_reloads_once_per_backoff_window(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, "tick", FailurePolicy.RELOAD, reload_backoff_s=30.0)
    first = plugin._vm
    rig.run_for(0.2)
    # The first trap reloaded at once; the new VM's tick traps too, but inside the window.
    assert plugin.report().counters.reloads == 1 and plugin._vm is not first
    assert plugin.report().counters.traps >= 2
    assert plugin.report().state is PluginState.RELOADING
    assert starts(rig) == 2
    assert plugin.report().vm_count == 1  # the old VM, with no streams, was released
