"""What hot reload tells the rest of the proxy: typed reload events and their history.

`Reloader` (sluice/proxy/reload.py) records one `ReloadEvent` per attempt in a `ReloadHistory`;
the admin API shows the recent events and `/stats` the counts. The counts are kept as events are
recorded, so they stay exact however many events the bounded history has dropped since.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Protocol

__all__ = ["ReloadCounter", "ReloadEvent", "ReloadHistory", "ReloadSource", "ReloadTrigger"]

MAX_EVENTS = 100
"""Recent events the history keeps (the admin API shows them)."""


class ReloadTrigger(enum.StrEnum):
    """What started a reload attempt (shown as text by the admin API)."""

    FILE = "file"
    """A module of the chain changed."""
    CONFIG = "config"
    """The config file changed."""
    ADMIN = "admin"
    """`POST /reload`."""
    STARTUP = "startup"
    """The initial load (recorded so the history starts with it; not a reload)."""


@dataclasses.dataclass(frozen=True)
class ReloadEvent:
    """One reload attempt, as the admin endpoint shows it (contract: docs/config-model.md)."""

    time: float
    """time.time() when the attempt finished."""
    trigger: ReloadTrigger
    ok: bool
    """Whether the attempt was applied (else the running generation stays)."""
    generation: int | None
    """The generation now serving (the new one if ok)."""
    changed: list[str]
    """Files that triggered it (module paths and/or the config path); empty for admin/startup."""
    error: str | None
    """"<file>: <reason>" when not ok."""
    duration_ms: float
    notes: list[str] = dataclasses.field(default_factory=list)
    """Warnings about an applied reload, e.g. a `listen` change that needs a restart."""


class ReloadCounter:
    """Applied and failed reloads since start, counted as each event is recorded.

    The "startup" event (the initial load) is not a reload and is not counted.
    """

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0

    def count(self, event: ReloadEvent) -> None:
        if event.trigger is ReloadTrigger.STARTUP:
            return
        if event.ok:
            self.ok += 1
        else:
            self.failed += 1


class ReloadHistory:
    """The recent reload events (newest last), the last failure, and the counts since start."""

    def __init__(self, maxlen: int = MAX_EVENTS) -> None:
        self.events: collections.deque[ReloadEvent] = collections.deque(maxlen=maxlen)
        self.last_error: ReloadEvent | None = None
        self.counts = ReloadCounter()

    def record(self, event: ReloadEvent) -> None:
        self.events.append(event)
        self.counts.count(event)
        if not event.ok:
            self.last_error = event


class ReloadSource(Protocol):
    """What the admin API needs of hot reload: run one attempt, and read the history."""

    @property
    def history(self) -> ReloadHistory: ...

    async def reload(self, trigger: ReloadTrigger = ReloadTrigger.ADMIN) -> ReloadEvent: ...
