"""`ConnectionTimer`: the one timer a connection owns, firing at the earliest deadline asked for.

A connection has several deadlines (a head due, a body stalled, a response late, an idle upstream)
and requests come and go far faster than any of them; a timer handle per request or per read
would cost more than the I/O. So a connection keeps one handle: `arm(at)` moves it only when `at`
is earlier than the time it is set for, and the callback, when it fires, looks at the state and
arms again for whatever is due next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class ConnectionTimer:
    __slots__ = ("_loop", "_callback", "_handle", "_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    def arm(self, at: float) -> None:
        """Fire by `at` (loop time); a later time than the one set changes nothing."""
        handle = self._handle
        if handle is not None:
            if self._at <= at:
                return
            handle.cancel()
        self._at = at
        self._handle = self._loop.call_at(at, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._callback()
