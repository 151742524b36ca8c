"""The fast-call layer refuses a wasmtime other than the pinned one, saying what to do."""

from __future__ import annotations

import time
from importlib import metadata

import pytest
import wasmtime
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.abi import fastcall
from sluice.abi.common import CALLBACK_BOUNDS_S
from sluice.histogram import Histogram


def test_installed_wasmtime_is_the_pinned_one() -> None:
    assert metadata.version("wasmtime") == fastcall.WASMTIME_VERSION


def test_a_different_wasmtime_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastcall.metadata, "version", lambda name: "51.0.0")
    with pytest.raises(ImportError) as err:
        fastcall._check_wasmtime_version()
    message = str(err.value)
    assert "wasmtime 51.0.0 is installed" in message
    assert f"pip install 'wasmtime=={fastcall.WASMTIME_VERSION}'" in message


def test_the_epoch_advances_from_the_compiled_ticker_thread() -> None:
    # `pip install -e .` builds sluice.abi._ticker; without it every tick costs libc a new thread.
    engine = fastcall.engine()
    assert fastcall.TICKER[0] == "thread"
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1)
    module = wasmtime.Module(engine, "(module (func (export \"spin\") (loop (br 0))))")
    spin = wasmtime.Instance(store, module, []).exports(store)["spin"]
    assert isinstance(spin, wasmtime.Func)
    started = time.monotonic()
    with pytest.raises(wasmtime.Trap):
        spin(store)
    assert time.monotonic() - started < 1.0  # interrupted by the ticker, within a few ticks


# -- the compiled layer (_fastcall) through the façade ----------------------------------------------

_KINDS_WAT = """
(module
  (import "t" "echo" (func $echo (param i32 i64 f64) (result i64)))
  (import "t" "boom" (func $boom))
  (memory (export "memory") 1)
  (func (export "neg") (param i32) (result i32) (i32.sub (i32.const 0) (local.get 0)))
  (func (export "wide") (param i64) (result i64) (i64.add (local.get 0) (i64.const 1)))
  (func (export "half") (param f64) (result f64) (f64.mul (local.get 0) (f64.const 0.5)))
  (func (export "echo") (param i32 i64 f64) (result i64) (call $echo (local.get 0) (local.get 1) (local.get 2)))
  (func (export "boom") (call $boom))
)
"""


class _Impls:
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, float]] = []

        def echo(a: int, b: int, c: float) -> int:
            self.seen.append((a, b, c))
            return b * 2

        def boom() -> None:
            raise ValueError("no such thing")

        self.host_impls = [echo, boom]


def _instance() -> tuple[wasmtime.Store, fastcall.StoreHandle, dict[str, fastcall.WasmFunction], fastcall.LinearMemory]:
    engine = fastcall.engine()
    linker = wasmtime.Linker(engine)
    fastcall.define_host_functions(
        linker, [fastcall.HostFunction("t", "echo", "Iqd", "q"), fastcall.HostFunction("t", "boom", "")]
    )
    store = wasmtime.Store(engine)
    handle = fastcall.StoreHandle(store, 1000)
    instance = linker.instantiate(store, wasmtime.Module(engine, _KINDS_WAT))
    exports = instance.exports(store)
    sigs = {"neg": ("i", "i"), "wide": ("q", "q"), "half": ("d", "d"), "echo": ("iqd", "q"), "boom": ("", "")}
    fns = {}
    for name, (params, results) in sigs.items():
        func = exports[name]
        assert isinstance(func, wasmtime.Func)
        fns[name] = fastcall.WasmFunction(handle, name, func, params, results)
    memory = exports["memory"]
    assert isinstance(memory, wasmtime.Memory)
    return store, handle, fns, fastcall.LinearMemory(handle, memory)


def test_calls_carry_each_value_kind_both_ways() -> None:
    _store, handle, fns, _memory = _instance()
    handle.arm_deadline()
    assert fns["neg"](5) == -5
    assert fns["neg"](0xFFFFFFFF) == 1  # an unsigned i32 argument wraps like wasm's i32
    assert fns["wide"](2**62) == 2**62 + 1
    assert fns["half"](3.0) == 1.5
    impls = _Impls()
    assert fns["echo"].call_in(handle, impls, (-1, -(2**40), 2.25)) == -(2**41)
    assert impls.seen == [(0xFFFFFFFF, -(2**40), 2.25)]  # "I": the host sees the unsigned value
    with pytest.raises(TypeError):
        fns["neg"](1, 2)


def test_a_host_function_that_raises_traps_the_call_naming_it() -> None:
    _store, handle, fns, _memory = _instance()
    with pytest.raises(fastcall.WasmTrap) as err:
        fns["boom"].call_in(handle, _Impls(), ())
    assert "host function t.boom failed: ValueError: no such thing" in str(err.value)
    assert not fastcall.ACTIVE  # the instance is off the dispatch stack again


def test_call_in_times_a_call_that_returns() -> None:
    _store, handle, fns, _memory = _instance()
    timing: list[float] = []
    assert fns["neg"].call_in(handle, _Impls(), (3,), timing) == -3
    assert len(timing) == 1 and 0 <= timing[0] < 1.0


def test_memory_accessors_answer_out_of_bounds_instead_of_raising() -> None:
    _store, _handle, _fns, memory = _instance()
    size = memory.size
    assert size == 65536
    assert memory.write(10, b"abc") and memory.read(10, 3) == b"abc"
    assert memory.write_u32(0, 0x01020304) and memory.read(0, 4) == b"\x04\x03\x02\x01"
    assert memory.write_u64(size - 8, 2**64 - 1) and memory.read(size - 8, 8) == b"\xff" * 8
    assert memory.read(size - 1, 2) is None and memory.read(-1, 1) is None and memory.read(0, -1) is None
    assert not memory.write(size - 1, b"xy") and not memory.write_u32(size - 3, 1)
    assert memory.read(size, 0) == b"" and memory.read(size + 1, 0) is None
    assert memory.write_returned(100, b"hello", 200, 204)
    assert memory.read(100, 5) == b"hello" and memory.read(200, 8) == b"\x64\0\0\0\x05\0\0\0"
    assert not memory.write_returned(0, b"x", 200, 204)  # a null pointer from the allocator
    assert not memory.write_returned(size - 2, b"xyz", 200, 204)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(CALLBACK_BOUNDS_S), st.floats(0, 0.2, allow_nan=False)), max_size=40))
def test_callback_times_bucket_like_a_histogram(values: list[float]) -> None:
    """The C bucketing of callback times puts each value where `Histogram` does (a value equal
    to a bound falls in that bound's bucket), with the same count and sum."""
    times = fastcall.CallbackTimes(CALLBACK_BOUNDS_S)
    reference = Histogram(CALLBACK_BOUNDS_S)
    for value in values:
        times.observe(value)
        reference.observe(value)
    got, want = times.snapshot(), reference.snapshot()
    assert (got.bounds, got.counts, got.count) == (want.bounds, want.counts, want.count)
    assert got.sum == pytest.approx(want.sum)
