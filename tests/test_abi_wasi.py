"""WASI preview 1 as sluice offers it (reference section 5), under both module names.

fixtures/wat/wasi.wat imports the same functions from `wasi_snapshot_preview1` and
`wasi_unstable` and logs "<call>=<result>" for each.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from hosting import FilterRig

from sluice import abi
from sluice.abi import LogLevel
from sluice.abi.wasi import RandomPool

WAT = Path(__file__).resolve().parent / "fixtures" / "wat" / "wasi.wat"

SUCCESS = 0
BADF = 8
FAULT = 21
INVAL = 28
NOTSUP = 58


@pytest.fixture(scope="module")
def wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wat") / "wasi.wasm"
    out.write_bytes(wasmtime.wat2wasm(WAT.read_text()))
    return out


@pytest.fixture
def rig() -> Iterator[FilterRig]:
    with FilterRig() as r:
        yield r


def reports(rig: FilterRig) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, _, message in rig.logs:
        name, sep, value = message.partition("=")
        if sep and value.isdigit() and name.replace("_", "").isalnum():
            out[name] = int(value)
    return out


def run(rig: FilterRig, wasm: Path, **spec: object) -> tuple[abi.Plugin, dict[str, int]]:
    plugin = rig.load(wasm, name="wasi-filter", **spec)
    ex = rig.request(plugin)
    assert ex.local_reply is None and ex.status == 200
    assert plugin.report().counters.traps == 0, plugin.report().last_error
    return plugin, reports(rig)


def test_stdout_and_stderr_land_in_the_filter_log(rig: FilterRig, wasm: Path) -> None:
    _, seen = run(rig, wasm)
    assert seen["fd_write"] == SUCCESS and seen["fd_write_unstable"] == SUCCESS
    assert ("wasi-filter", LogLevel.INFO, "out line") in rig.logs  # trailing newline stripped
    assert ("wasi-filter", LogLevel.ERROR, "err line") in rig.logs  # stderr is an error
    assert ("wasi-filter", LogLevel.INFO, "multi part") in rig.logs  # iovecs gathered
    assert seen["written"] == len(b"multi part\n")
    assert ("wasi-filter", LogLevel.INFO, "no newline") in rig.logs
    assert ("wasi-filter", LogLevel.ERROR, "two\n") in rig.logs  # only one newline is stripped
    assert seen["fd_write_bad_iovec"] == FAULT


def test_start_function_output_is_logged_at_load(rig: FilterRig, wasm: Path) -> None:
    rig.load(wasm, name="wasi-filter")
    assert rig.logs[0] == ("wasi-filter", LogLevel.INFO, "initialized")


def test_stdout_follows_the_filter_log_level(rig: FilterRig, wasm: Path) -> None:
    run(rig, wasm, log_level=LogLevel.ERROR)
    messages = [m for _, _, m in rig.logs]
    assert "out line" not in messages and "initialized" not in messages
    assert ("wasi-filter", LogLevel.ERROR, "err line") in rig.logs


def test_clocks(rig: FilterRig, wasm: Path) -> None:
    before = time.time_ns()
    _, seen = run(rig, wasm)
    after = time.time_ns()
    assert seen["realtime"] == SUCCESS
    realtime = (seen["realtime_hi"] << 32) | seen["realtime_lo"]
    assert before - 1_000_000_000 <= realtime <= after + 1_000_000_000  # wall clock, ns since 1970
    assert seen["monotonic_unstable"] == SUCCESS
    assert seen["clock_3"] == NOTSUP  # thread CPU time: not offered


def test_random_get(rig: FilterRig, wasm: Path) -> None:
    _, seen = run(rig, wasm)
    assert seen["random"] == SUCCESS and seen["random_unstable"] == SUCCESS
    raw = [m.encode("utf-8", "surrogateescape") for _, _, m in rig.logs]
    first = raw[raw.index(b"random=0") + 1]
    second = raw[raw.index(b"random_unstable=0") + 1]
    assert len(first) == len(second) == 32
    assert first != bytes(32) and second != bytes(32) and first != second
    assert seen["random_64k"] == SUCCESS
    assert seen["random_too_big"] == INVAL


def test_random_pool_hands_each_byte_out_once_and_not_across_a_fork() -> None:
    pool = RandomPool()
    small = [pool.take(16) for _ in range(RandomPool.REFILL // 16 + 3)]  # crosses a refill
    assert all(len(b) == 16 for b in small) and len(set(small)) == len(small)
    assert len(pool.take(RandomPool.REFILL + 1)) == RandomPool.REFILL + 1  # beyond the pool: direct
    pool.take(8)  # the pool holds bytes now; a child must not hand out the same ones
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next bytes, then out without running the parent's cleanup
        os.write(write_end, pool.take(32))
        os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 32)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child != pool.take(32)


def test_args_poll_and_preopens(rig: FilterRig, wasm: Path) -> None:
    _, seen = run(rig, wasm)
    assert seen["args_sizes_get"] == SUCCESS
    assert seen["argc"] == 0 and seen["argv_size"] == 0
    assert seen["poll_oneoff"] == SUCCESS
    assert seen["fd_prestat_get"] == BADF and seen["fd_prestat_get_unstable"] == BADF
    assert seen["sched_yield"] == SUCCESS
