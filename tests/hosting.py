"""Test support: the single-filter rig (a real Runtime and a real Host on an asyncio loop) and
small helpers the abi and filter tests share."""

from __future__ import annotations

import socket

from sluice import abi
from sluice.proxy.filtertest import Exchange, FilterRig, Phase, Recorder

__all__ = ["Exchange", "FilterRig", "Phase", "Recorder", "closed_port", "metric_values", "rh"]


def rh(ex: Exchange) -> abi.HeaderMap:
    """Response headers as the filter left them (for exchanges that always have a response)."""
    assert ex.response_headers is not None
    return ex.response_headers


def metric_values(plugin: abi.Plugin) -> dict[str, int]:
    """The filter's ABI-defined metrics by name (counter/gauge value, histogram sample count)."""
    return {m.name: m.value for m in plugin.report().metrics}


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released): callouts to it fail at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
