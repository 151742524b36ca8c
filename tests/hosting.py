"""Test support: the single-filter rig (a real Runtime and a real Host on an asyncio loop)."""

from proxy.filtertest import Exchange, FilterRig, Phase

__all__ = ["Exchange", "FilterRig", "Phase"]
