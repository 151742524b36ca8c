"""The sandbox around a filter: memory cap, re-entrant host calls, WASI capabilities.

Hand-written WAT fixtures (fixtures/wat/) do what SDK-built filters never do.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from hosting import FilterRig

from sluice import abi
from sluice.abi import LogLevel
from sluice.abi.types import WasmResult

WAT_DIR = Path(__file__).resolve().parent / "fixtures" / "wat"
MIB = 1 << 20
PAGE = 65536


def compile_wat(name: str, tmp_path: Path) -> Path:
    out = tmp_path / f"{name}.wasm"
    out.write_bytes(wasmtime.wat2wasm((WAT_DIR / f"{name}.wat").read_text()))
    return out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def rig() -> Iterator[FilterRig]:
    with FilterRig(clusters={"dead": f"127.0.0.1:{_closed_port()}"}) as r:
        yield r


def reports(rig: FilterRig, plugin: str = "filter") -> dict[str, int]:
    """The module's "name=value" log lines (the last value of each name)."""
    out: dict[str, int] = {}
    for who, _, message in rig.logs:
        if who != plugin:
            continue
        name, sep, value = message.partition("=")
        if sep and value.isdigit():
            out[name] = int(value)
    return out


# -- memory ------------------------------------------------------------------------------------


def test_memory_grow_stops_at_the_cap_without_trapping(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(compile_wat("grow", tmp_path), memory_limit=2 * MIB)
    ex = rig.request(plugin)
    assert ex.local_reply is None and ex.status == 200
    assert plugin.report().counters.traps == 0
    seen = reports(rig)
    # The module grew until memory.grow answered -1, and never got past the cap.
    assert 1 < seen["pages"] <= 2 * MIB // PAGE
    assert seen["refused"] == 0xFFFFFFFF
    assert seen["huge"] == 0xFFFFFFFF
    assert plugin.report().memory_bytes <= 2 * MIB
    # Another request finds the memory already full and is still served.
    assert rig.request(plugin).status == 200
    assert reports(rig)["pages"] == seen["pages"]
    assert plugin.report().memory_bytes <= 2 * MIB


def test_memory_bytes_sees_growth_done_by_the_module(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(compile_wat("grow", tmp_path), memory_limit=2 * MIB)
    assert plugin.report().memory_bytes == PAGE
    rig.request(plugin)
    assert plugin.report().memory_bytes == reports(rig)["pages"] * PAGE


def test_the_cap_is_per_plugin(rig: FilterRig, tmp_path: Path) -> None:
    wasm = compile_wat("grow", tmp_path)
    small = rig.load(wasm, name="small", memory_limit=1 * MIB)
    large = rig.load(wasm, name="large", memory_limit=4 * MIB)
    rig.request(small)
    rig.request(large)
    assert 1 < reports(rig, "small")["pages"] <= 1 * MIB // PAGE
    assert 2 * MIB // PAGE < reports(rig, "large")["pages"] <= 4 * MIB // PAGE


def test_initial_memory_above_the_cap_fails_to_load(rig: FilterRig, tmp_path: Path) -> None:
    wasm = compile_wat("bigmem", tmp_path)
    with pytest.raises(abi.PluginLoadError) as err:
        rig.load(wasm, memory_limit=2 * MIB)
    assert err.value.path == str(wasm)
    assert "instantiat" in err.value.reason
    assert "memory" in err.value.reason.lower()
    # Under a cap it fits in, the same module loads.
    plugin = rig.load(wasm, name="roomy", memory_limit=8 * MIB)
    assert plugin.report().memory_bytes == 64 * PAGE


# -- re-entrancy -------------------------------------------------------------------------------


def test_allocator_may_call_proxy_log_while_the_host_returns_a_buffer(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(compile_wat("reentrant", tmp_path))
    ex = rig.request(plugin, path="/hello")
    assert ex.status == 200 and plugin.report().counters.traps == 0
    messages = [m for _, _, m in rig.logs]
    # The allocator logged from inside proxy_get_header_map_value, then the value arrived intact.
    i = messages.index("malloc=6")
    assert messages[i + 1 : i + 3] == ["path_status=0", "/hello"]


def test_root_callback_acts_on_a_paused_stream_through_the_effective_context(
    rig: FilterRig, tmp_path: Path
) -> None:
    plugin = rig.load(compile_wat("reentrant", tmp_path))
    ex = rig.request(plugin, path="/pause", wait=5.0)
    seen = reports(rig)
    assert seen["http_call"] == WasmResult.OK
    # As the root, the stream's headers are out of reach...
    assert seen["add_as_root"] == WasmResult.BAD_ARGUMENT
    # ...an unknown context id is refused...
    assert seen["effective_unknown"] == WasmResult.BAD_ARGUMENT
    # ...and acting as the paused stream, the root edits its headers and resumes it.
    assert seen["effective"] == WasmResult.OK
    assert seen["add"] == WasmResult.OK
    assert seen["continue"] == WasmResult.OK
    assert ex.phases[0].name == "request_headers" and ex.phases[0].status == "stop→resumed"
    assert ex.request_headers.get("x-from-root") == "yes"
    assert ex.local_reply is None and ex.status == 200


# -- WASI capabilities -------------------------------------------------------------------------


def test_files_sockets_and_other_fds_are_not_reachable(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(compile_wat("caps", tmp_path))
    ex = rig.request(plugin)
    assert ex.status == 200 and plugin.report().counters.traps == 0
    seen = reports(rig)
    assert seen["path_open"] == 44  # NOENT
    for call in ("sock_accept", "sock_recv", "sock_send", "sock_shutdown"):
        assert seen[call] == 58, call  # NOTSUP
    assert seen["fd_write_3"] == 8  # BADF
    assert not any("hello" in m for _, _, m in rig.logs)


def test_environment_comes_only_from_the_spec(
    rig: FilterRig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_TEST_SECRET", "must-not-leak")
    assert "SLUICE_TEST_SECRET" in os.environ
    plugin = rig.load(compile_wat("caps", tmp_path), environment={"A": "1", "FOO": "bar baz"})
    rig.request(plugin)
    seen = reports(rig)
    block = "A=1\0FOO=bar baz\0"
    assert seen["environ_sizes_get"] == 0 and seen["environ_get"] == 0
    assert seen["environ_count"] == 2
    assert seen["environ_size"] == len(block)
    assert ("filter", LogLevel.INFO, block) in rig.logs
    assert not any("must-not-leak" in m or "SLUICE_TEST_SECRET" in m for _, _, m in rig.logs)


def test_no_environment_by_default(rig: FilterRig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_TEST_SECRET", "must-not-leak")
    plugin = rig.load(compile_wat("caps", tmp_path))
    rig.request(plugin)
    seen = reports(rig)
    assert seen["environ_count"] == 0 and seen["environ_size"] == 0 and seen["environ_get"] == 0


def test_host_writes_into_memory_the_allocator_just_grew(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(compile_wat("growing_alloc", tmp_path), memory_limit=2 * MIB)
    value = "0123456789" * 10_000  # 100 kB: two fresh pages beyond the initial one
    ex = rig.request(plugin, headers=[("x-value", value)])
    assert ex.status == 200 and plugin.report().counters.traps == 0
    seen = reports(rig)
    assert seen["value_status"] == WasmResult.OK and seen["value_size"] == len(value)
    assert ("filter", LogLevel.INFO, "01234567") in rig.logs


def test_allocation_past_the_cap_is_a_status_not_a_trap(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(compile_wat("growing_alloc", tmp_path), memory_limit=2 * MIB)
    ex = rig.request(plugin, headers=[("x-value", "z" * (3 * MIB))])
    assert ex.status == 200 and plugin.report().counters.traps == 0
    seen = reports(rig)
    assert seen["value_status"] == WasmResult.INVALID_MEMORY_ACCESS  # malloc answered 0
    assert seen["value_size"] == 0
    # A value that fits still arrives afterwards.
    rig.request(plugin, headers=[("x-value", "abcdefgh-small")])
    assert reports(rig)["value_status"] == WasmResult.OK
    assert ("filter", LogLevel.INFO, "abcdefgh") in rig.logs


class SnapshotEvents:
    """StreamCallbacks noting how many log lines existed when each event arrived."""

    def __init__(self, rig: FilterRig) -> None:
        self.rig = rig
        self.events: list[tuple[str, int, object]] = []

    def _note(self, what: str, detail: object = None) -> None:
        self.events.append((what, len(self.rig.logs), detail))

    def continue_request(self) -> None:
        self._note("continue_request")

    def continue_response(self) -> None:
        self._note("continue_response")

    def send_local_reply(self, reply: abi.LocalReply) -> None:
        self._note("local_reply", reply)

    def reset(self) -> None:
        self._note("reset")


def test_local_reply_reaches_the_proxy_after_the_callback_returns(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(compile_wat("reentrant", tmp_path))
    events = SnapshotEvents(rig)
    headers = abi.HeaderMap([(":method", "GET"), (":path", "/reply"), (":authority", "example.com")])
    stream = plugin.new_stream(abi.StreamInfo(request_headers=headers), events)
    status = stream.request_headers(headers, True)
    stream.complete()
    messages = [m for _, _, m in rig.logs]
    assert messages[-2:] == ["reply=0", "after reply"]
    assert len(events.events) == 1
    what, logs_then, reply = events.events[0]
    assert what == "local_reply"
    assert logs_then == len(rig.logs)  # delivered after the module's last log line, not inside the call
    assert isinstance(reply, abi.LocalReply) and reply.status == 403 and reply.body == b"denied"
    # The filter returned Continue, but a local reply stops the chain.
    assert status is abi.FilterStatus.STOP
