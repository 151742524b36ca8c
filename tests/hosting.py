"""Test support: the single-filter rig (a real Runtime and a real Host on an asyncio loop) and
small helpers the abi and filter tests share."""

from __future__ import annotations

from sluice import abi
from sluice.abi import LocalReply
from sluice.proxy.filtertest import Exchange, FilterRig, Phase

__all__ = ["Exchange", "FilterRig", "Phase", "Recorder", "metric_values", "rh"]


class Recorder:
    """`abi.StreamCallbacks` for driving a stream by hand: records every event in order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.replies: list[LocalReply] = []

    def continue_request(self) -> None:
        self.events.append("continue_request")

    def continue_response(self) -> None:
        self.events.append("continue_response")

    def send_local_reply(self, reply: LocalReply) -> None:
        self.events.append("local_reply")
        self.replies.append(reply)

    def reset(self) -> None:
        self.events.append("reset")


def rh(ex: Exchange) -> abi.HeaderMap:
    """Response headers as the filter left them (for exchanges that always have a response)."""
    assert ex.response_headers is not None
    return ex.response_headers


def metric_values(plugin: abi.Plugin) -> dict[str, int]:
    """The filter's ABI-defined metrics by name (counter/gauge value, histogram sample count)."""
    return {m.name: m.value for m in plugin.report().metrics}
