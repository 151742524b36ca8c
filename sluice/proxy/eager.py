"""Run a coroutine eagerly: synchronously as far as it gets, and without a Task when it finishes.

Most requests find an idle upstream connection, so `ClusterPool.acquire()` returns without ever
suspending; wrapping it in a Task would cost a Task, a loop iteration and a done-callback on every
request for nothing. `start()` steps the coroutine right away and calls `done` before returning
when it completes; only when it does suspend (a real connect, a full pool) does it continue as a
Task, from where it stopped.
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

Done = Callable[[T | None, BaseException | None], None]


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], pending: Any) -> Generator[Any, Any, T]:
    """Continue `coro`, which has just yielded `pending` (a future it awaits), inside a Task."""
    value: Any = None
    error: BaseException | None = None
    try:
        yield pending
    except BaseException as exc:  # the Task was cancelled while the coroutine waited
        error = exc
    while True:
        try:
            nxt = coro.throw(error) if error is not None else coro.send(value)
        except StopIteration as stop:
            result: T = stop.value
            return result
        error = None
        value = None
        try:
            value = yield nxt
        except BaseException as exc:
            error = exc


def start(coro: Coroutine[Any, Any, T], done: Done[T]) -> asyncio.Task[T] | None:
    """Step `coro` now. If it completes, `done(result, None)` (or `done(None, exc)`) has been
    called when this returns None; else the rest runs in the returned Task, which calls `done`."""
    if sys.version_info >= (3, 12):
        # The loop does this itself since 3.12 (and asyncio.timeout, used by wait_for there,
        # needs the current task from the first step on).
        eager = asyncio.Task(coro, eager_start=True)
        if eager.done():
            if eager.cancelled():
                done(None, asyncio.CancelledError())
            else:
                done(eager.result() if eager.exception() is None else None, eager.exception())
            return None
        eager.add_done_callback(lambda t: _finished(t, done))
        return eager
    try:
        pending = coro.send(None)
    except StopIteration as stop:
        done(stop.value, None)
        return None
    except Exception as exc:
        done(None, exc)
        return None
    task: asyncio.Task[T] = asyncio.get_running_loop().create_task(_resume(coro, pending))

    task.add_done_callback(lambda t: _finished(t, done))
    return task


def _finished(task: asyncio.Task[T], done: Done[T]) -> None:
    if task.cancelled():
        done(None, asyncio.CancelledError())
    elif task.exception() is not None:
        done(None, task.exception())
    else:
        done(task.result(), None)
