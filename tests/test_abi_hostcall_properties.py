"""Property-based tests over host-call arguments (issue 13, item 9): random pointers, sizes, map
and buffer types into every host function a module can import (env and WASI), through
fixtures/wat/hostcall_forward.wat. Whatever the arguments: no exception escapes, every answer
is a status code of its ABI (WasmResult for env, an errno for WASI), nothing traps, and the
same VM goes on serving.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from forwarding import DATA, FUNCTIONS, MEMORY, compile_forwarder, forward_headers, statuses
from hosting import FilterRig
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sluice import abi
from sluice.abi.hostcalls import ENV_FUNCTIONS
from sluice.abi.types import WasmResult
from sluice.abi.wasi import FUNCTIONS as WASI_FUNCTIONS

WASM_RESULTS = {int(r) for r in WasmResult}
WASI_ERRNO_MAX = 76  # the last errno of WASI preview 1 (notcapable)
WASI = {name for name, _, _ in WASI_FUNCTIONS}
# What the forwarder leaves out: deliberate traps (abort, proc_exit) and calls with no status.
NOT_FORWARDED = {"abort", "seed", "trace", "emscripten_notify_memory_growth", "pthread_equal", "proc_exit"}

U32 = 0xFFFFFFFF
interesting = st.sampled_from([
    0, 1, 2, 3, 4, 7, 8, 12, 0x40, 0x80, 0x100, DATA, DATA + 3, DATA + 0x7FFC, 0x10000,
    MEMORY - 8, MEMORY - 4, MEMORY - 1, MEMORY, MEMORY + 1, 0x7FFFFFFF, 0x80000000, U32 - 15, U32,
])
argument = st.one_of(interesting, st.integers(0, 16), st.integers(0, 1 << 16), st.integers(0, U32))


@pytest.fixture(scope="module")
def forwarder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FilterRig, abi.Plugin]]:
    with FilterRig() as rig:
        # A wide CPU deadline: what is under test is the arguments, not a loaded machine's timing.
        module = compile_forwarder(tmp_path_factory.mktemp("forward"))
        plugin = rig.load(module, log_level=abi.LogLevel.TRACE, cpu_deadline_ms=1000.0)
        yield rig, plugin
    # Collect what the examples left behind now, not in the middle of a later test's callback
    # (a full collection of it takes longer than a CPU deadline).
    gc.collect()


def test_the_forwarder_covers_every_host_function() -> None:
    expected = [n for n, _, _ in ENV_FUNCTIONS if n not in NOT_FORWARDED]
    expected += [n for n, _, _ in WASI_FUNCTIONS if n not in NOT_FORWARDED]
    # Out of date: run tests/fixtures/wat/make_forward.py from the repository root.
    assert sorted(FUNCTIONS, key=FUNCTIONS.__getitem__) == expected


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    function=st.sampled_from(sorted(FUNCTIONS)),
    args=st.lists(argument, min_size=12, max_size=12),
    data=st.one_of(st.none(), st.binary(max_size=96)),
    body=st.sampled_from([b"", b"hello"]),
)
# A u64 argument above 2**63 (what CI's run found when the compiled record_metric took C longs).
@example(function="proxy_record_metric", args=[0] * 11 + [0x80000000], data=None, body=b"")
def test_any_arguments_get_a_status_and_the_vm_keeps_serving(
    forwarder: tuple[FilterRig, abi.Plugin], function: str, args: list[int], data: bytes | None, body: bytes
) -> None:
    rig, plugin = forwarder
    if len(rig.logs) > 10_000:
        rig.logs.clear()
    before = len(statuses(rig))
    ex = rig.request(plugin, "POST" if body else "GET", headers=forward_headers(function, tuple(args), data),
                     body=body)
    seen = statuses(rig)
    assert len(seen) > before, f"{function} did not return to the module"
    status = seen[-1]
    if function in WASI:
        assert 0 <= status <= WASI_ERRNO_MAX, (function, args, status)
    else:
        assert status in WASM_RESULTS, (function, args, status)
    report = plugin.report()
    assert report.counters.traps == 0 and report.counters.deadlines == 0, report.last_error
    assert report.state is abi.PluginState.OK
    # Never the failure policy's reply (a forwarded proxy_send_local_response may send its own).
    assert ex.local_reply is None or ex.local_reply.details != "wasm_fail_stream"
    # The same VM serves a plain request next, untouched by what the call did.
    assert rig.request(plugin).status == 200
    assert plugin.report().vm_count == 1
