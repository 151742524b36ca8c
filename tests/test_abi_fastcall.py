"""The fast-call layer refuses a wasmtime other than the pinned one, saying what to do."""

from __future__ import annotations

from importlib import metadata

import pytest

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
