"""The fast-call layer refuses a wasmtime other than the pinned one, saying what to do."""

from __future__ import annotations

import time
from importlib import metadata

import pytest
import wasmtime

from sluice.abi import fastcall


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
