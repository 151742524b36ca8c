"""Hot reload: watch `filters_dir` and the config file; swap in a new `Generation` when they change.

A change is picked up in four steps (docs/hot-reload.md):

1. **Notice.** `watchfiles.awatch` watches the directories holding the config file and the chain's
   modules (not recursively). Only the config file and the modules the chain uses count; editor swap
   files, `sluice/filters/.tmp` of an atomic rename and the like are ignored.
2. **Build.** A complete new Generation is built off to the side: the config is re-read if it
   changed, every module is compiled in a worker thread (validation: wasm magic, version, wasmtime
   validation, the ABI marker), VMs are instantiated and must pass `proxy_on_vm_start` and
   `proxy_on_configure`. Filters whose entry and module bytes did not change keep their Plugin.
3. **Settle.** A file being copied in place (`cp new.wasm sluice/filters/auth.wasm`) changes size and mtime
   while it is written. The changed modules' size, mtime and inode are polled before the build and
   again after it, at least `SETTLE_INTERVAL_S` later; unless both polls agree, the build (or its
   failure) is dropped and the file's next change starts over.
4. **Swap.** `Gateway.install` makes it current in one assignment. Requests in flight keep the
   generation they started on (streams, paused callouts); the old one retires when its last
   request ends: its new-in-this-swap plugins stop ticking and their VMs are released, its
   cluster pools close.

Anything failing in 2 leaves the running generation in place and is recorded in `events` /
`last_error` (file and reason) and logged, once the file has stayed unchanged for `ERROR_QUIET_S`.
If it changes before that (a write still in progress), the failure is not reported: the next
change retries it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import time
from pathlib import Path
from typing import Protocol

import watchfiles

from sluice import abi

from .config import ConfigError, HostPort, SluiceConfig, load_config
from .generation import Generation
from .reloadevents import ReloadEvent, ReloadHistory, ReloadTrigger

__all__ = ["ReloadEvent", "ReloadTarget", "ReloadTrigger", "Reloader"]

log = logging.getLogger("sluice.reload")

SETTLE_INTERVAL_S = 0.05
"""Time between the two polls that must agree before a changed file is read."""
ERROR_QUIET_S = 1.0
"""A file that fails to load must stay unchanged this long before the failure is reported."""
WATCH_STEP_MS = 10
"""watchfiles groups changes until none arrived for this long."""
COLLECT_DELAY_S = 0.5
"""Delay between a generation's disposal and the collection that frees its VMs (batches swaps)."""

_Stat = tuple[int, int, int] | None


class ReloadTarget(Protocol):
    """What the reloader needs of the proxy (`Gateway` is one)."""

    @property
    def generation(self) -> Generation: ...

    @property
    def config(self) -> SluiceConfig: ...

    @property
    def draining(self) -> bool: ...

    async def build_generation(self, config: SluiceConfig, previous: Generation | None = None) -> Generation: ...

    def install(self, gen: Generation) -> Generation | None: ...

    def certificate_files(self) -> set[Path]: ...

    def reload_certificates(self) -> list[str]: ...


class _StillChanging(Exception):
    """A file changed while it was being read: wait for its next change (not an error)."""


class _Failed(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _stat(path: Path) -> _Stat:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _same(gen: Generation, running: Generation) -> bool:
    """`gen` would change nothing: same config, every plugin carried over."""
    return (
        gen.config == running.config
        and len(gen.filters) == len(running.filters)
        and all(a.plugin is b.plugin for a, b in zip(gen.filters, running.filters, strict=True))
    )


class Reloader:
    """Watches the config file and the filters; rebuilds and swaps generations on change."""

    def __init__(self, gateway: ReloadTarget, config_path: Path) -> None:
        self.gateway = gateway
        self.config_path = Path(config_path).resolve()
        self.history = ReloadHistory()
        self.restart_needed: list[str] = []
        """Config changes applied to the file but not to the process (e.g. `listen`)."""
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._config_dirty = False
        """The config file changed but could not be applied: re-read it on every attempt."""
        self._wanted: set[Path] = set()
        """Module paths of a config that failed to load (their arrival should retry it)."""
        self._watching: tuple[Path, ...] = ()
        self._collect_handle: asyncio.TimerHandle | None = None

    @property
    def events(self) -> collections.deque[ReloadEvent]:
        """The recent attempts, newest last."""
        return self.history.events

    @property
    def last_error(self) -> ReloadEvent | None:
        return self.history.last_error

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin watching. Returns once the watches are in place."""
        if self._task is not None:
            return
        gen = self.gateway.generation
        self.history.record(ReloadEvent(time.time(), ReloadTrigger.STARTUP, True, gen.number, [], None, 0.0))
        self._stopping.clear()
        watch_log = logging.getLogger("watchfiles")
        if watch_log.level == logging.NOTSET:
            watch_log.setLevel(logging.WARNING)  # its "1 change detected" only repeats our own line
        ready = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._watch(ready), name="sluice-reload")
        # awatch sets up its inotify watches synchronously on its first step, which is the step
        # that sets `ready`; the waiter below runs after that step has finished.
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._task.done() and not self._task.cancelled() and self._task.exception() is not None:
            # Serving matters more than watching: say so, and leave POST /reload working.
            exc = self._task.exception()
            log.error("hot reload disabled: cannot watch %s: %s", ", ".join(map(str, self._watching)), exc)
            self._task = None

    async def stop(self) -> None:
        self._stopping.set()
        if self._collect_handle is not None:
            self._collect_handle.cancel()
            self._collect_handle = None
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), 2.0)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception:
            log.exception("reload watcher failed")

    # -- the admin entry point -------------------------------------------------------------------
    async def reload(self, trigger: ReloadTrigger = ReloadTrigger.ADMIN) -> ReloadEvent:
        """Re-read the config, rebuild every changed filter and swap; the same path a file change takes.
        The listeners' certificates are re-read too."""
        self.gateway.reload_certificates()
        event = await self._attempt(trigger, set(), settle=False)
        if event is None:  # only when shutting down (nothing is settled here)
            gen = self.gateway.generation
            event = ReloadEvent(time.time(), trigger, False, gen.number, [], "the proxy is shutting down", 0.0)
        return event

    # -- watching --------------------------------------------------------------------------------
    def _directories(self) -> tuple[Path, ...]:
        config = self.gateway.config
        dirs = {self.config_path.parent, Path(config.filters_dir)}
        dirs.update(Path(entry.module_path).parent for entry in config.chain)
        dirs.update(path.parent for path in self._wanted)
        dirs.update(path.parent for path in self.gateway.certificate_files())
        return tuple(sorted(d for d in dirs if d.is_dir()))

    def _interesting(self) -> set[Path]:
        paths = {self.config_path}
        paths.update(Path(entry.module_path) for entry in self.gateway.config.chain)
        paths.update(self._wanted)
        paths.update(self.gateway.certificate_files())
        return paths

    def _filter(self, change: watchfiles.Change, path: str) -> bool:
        return Path(path) in self._interesting()

    async def _watch(self, ready: asyncio.Event) -> None:
        while not self._stopping.is_set():
            dirs = self._directories()
            self._watching = dirs
            ready.set()
            if not dirs:  # pragma: no cover - the config's own directory exists
                return
            watcher = watchfiles.awatch(
                *dirs,
                watch_filter=self._filter,
                step=WATCH_STEP_MS,
                stop_event=self._stopping,
                recursive=False,
            )
            try:
                async for changes in watcher:
                    changed = {Path(path) for _, path in changes} & self._interesting()
                    if not changed:
                        continue
                    certificates = changed & self.gateway.certificate_files()
                    if certificates:
                        # Certificates are the listeners', not a generation's: they swap on their own.
                        await self._settle_certificates(certificates)
                        changed -= certificates
                        if not changed:
                            continue
                    trigger = ReloadTrigger.CONFIG if self.config_path in changed else ReloadTrigger.FILE
                    try:
                        await self._attempt(trigger, changed, settle=True)
                    except Exception:  # never let one bad attempt end the watching
                        log.exception("reload failed unexpectedly")
                    if self._directories() != dirs:
                        break  # filters_dir moved: watch the new directories
            finally:
                await watcher.aclose()

    async def _settle_certificates(self, changed: set[Path]) -> None:
        """A certificate or key was rewritten: wait until it stops changing (a cert and its key are
        often written one after the other), then let each listener re-read its pairs."""
        for _ in range(20):  # bounded: a file rewritten without pause is read as it then is
            first = {path: _stat(path) for path in changed}
            await asyncio.sleep(SETTLE_INTERVAL_S)
            if all(_stat(path) == stat for path, stat in first.items()):
                break
        self.gateway.reload_certificates()

    # -- one attempt -------------------------------------------------------------------------------
    async def _attempt(self, trigger: ReloadTrigger, changed: set[Path], *, settle: bool) -> ReloadEvent | None:
        async with self._lock:
            started = time.perf_counter()
            names = sorted(str(p) for p in changed)
            gateway = self.gateway
            running = gateway.generation
            try:
                gen, notes = await self._build(trigger, changed, running, settle)
            except _StillChanging as exc:
                log.info("reload deferred: %s is still being written; waiting for its next change", exc)
                return None
            except _Failed as exc:
                event = ReloadEvent(
                    time.time(), trigger, False, running.number, names, exc.message,
                    (time.perf_counter() - started) * 1000,
                )
                log.error(
                    "reload failed (%s), still serving generation %d: %s", trigger, running.number, exc.message
                )
                self.history.record(event)
                return event
            if trigger in (ReloadTrigger.FILE, ReloadTrigger.CONFIG) and _same(gen, running):
                self._discard(gen, running)  # e.g. `touch`, or a write of identical bytes
                log.debug("no change in %s: generation %d stays", ", ".join(names), running.number)
                return None
            if gateway.draining:
                self._discard(gen, running)  # shutting down: the old generation drains, then stops
                log.info("reload (%s) dropped: the proxy is shutting down", trigger)
                return None
            old = gateway.install(gen)
            if old is not None:
                self._collect_when_disposed(old)
            event = ReloadEvent(
                time.time(), trigger, True, gen.number, names, None, (time.perf_counter() - started) * 1000, notes
            )
            reused = sum(1 for f in gen.filters if any(f.plugin is g.plugin for g in running.filters))
            log.info(
                "reloaded (%s%s): generation %d, %d filters (%d new, %d unchanged) in %.0f ms",
                trigger,
                f": {', '.join(names)}" if names else "",
                gen.number,
                len(gen.filters),
                len(gen.filters) - reused,
                reused,
                event.duration_ms,
            )
            self.history.record(event)
            return event

    async def _build(
        self, trigger: ReloadTrigger, changed: set[Path], running: Generation, settle: bool
    ) -> tuple[Generation, list[str]]:
        loop = asyncio.get_running_loop()
        config_changed = trigger is ReloadTrigger.ADMIN or self.config_path in changed or self._config_dirty
        config = running.config
        notes: list[str] = []
        # The settle check overlaps the build: the changed files' first poll is taken now, the
        # second once the build is done and at least SETTLE_INTERVAL_S has passed. The two must
        # agree, or what was read may be a snapshot of a write in progress.
        first = {p: _stat(p) for p in sorted(changed)} if settle else {}
        polled = time.monotonic()
        if config_changed:
            try:
                config = await loop.run_in_executor(None, load_config, self.config_path)
            except ConfigError as exc:
                self._config_dirty = True
                await self._confirm_failure(first, polled)
                raise _Failed("; ".join(exc.errors)) from None
            config, notes = self._keep_addresses(running.config, config)
        modules = {Path(entry.module_path) for entry in config.chain}
        try:
            gen = await self.gateway.build_generation(config, previous=running)
        except abi.PluginLoadError as exc:
            if config_changed:
                self._config_dirty = True
                self._wanted = modules
            await self._confirm_failure(first, polled)
            raise _Failed(f"{exc.path}: {exc.reason}") from None
        except Exception as exc:  # e.g. an unexpected failure building a cluster pool
            if config_changed:
                self._config_dirty = True
            raise _Failed(f"{self.config_path}: {type(exc).__name__}: {exc}") from None
        if await self._still_changing(first, polled):
            self._discard(gen, running)
            raise _StillChanging(", ".join(str(p) for p in first))
        if config_changed:
            self._config_dirty = False
            self._wanted = set()
            self.restart_needed = notes
        return gen, notes

    @staticmethod
    async def _confirm_failure(first: dict[Path, _Stat], polled: float) -> None:
        """Before a changed file's failure is reported, it must stay unchanged for ERROR_QUIET_S.

        A slow writer (a copy over the network, a build tool writing in pieces) can leave a
        partial file unchanged for longer than the settle interval; its failure is not news yet.
        Raises _StillChanging if the file changes meanwhile (its next change retries it).
        """
        if not first:
            return
        deadline = polled + ERROR_QUIET_S
        while True:
            moved = [str(path) for path, st in first.items() if _stat(path) != st]
            if moved:
                raise _StillChanging(", ".join(moved))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(SETTLE_INTERVAL_S, remaining))

    @staticmethod
    async def _still_changing(first: dict[Path, _Stat], polled: float) -> bool:
        """The second settle poll: has any file changed since `first` was taken at `polled`?"""
        if not first:
            return False
        wait = SETTLE_INTERVAL_S - (time.monotonic() - polled)
        if wait > 0:
            await asyncio.sleep(wait)
        return any(_stat(path) != st for path, st in first.items())

    def _discard(self, gen: Generation, running: Generation) -> None:
        gen.retire(frozenset(id(f.plugin) for f in running.filters))

    def _keep_addresses(self, old: SluiceConfig, new: SluiceConfig) -> tuple[SluiceConfig, list[str]]:
        """Settings a running process cannot change: keep the running values, say a restart is needed."""
        notes: list[str] = []
        update: dict[str, object] = {}
        if new.listen != old.listen:
            # One address prints as before; listeners as their URLs (their TLS blocks change too).
            was, now = (str(c.listen) if isinstance(c.listen, HostPort) else ", ".join(map(str, c.listeners))
                        for c in (old, new))
            if was == now:
                notes.append(f"listen: the tls settings of {was} changed: needs a restart "
                             "(still serving with the previous ones; certificate files reload by themselves)")
            else:
                notes.append(f"listen changed from {was} to {now}: needs a restart (still serving on {was})")
            update["listen"] = old.listen
        if new.admin.listen != old.admin.listen:
            notes.append(f"admin.listen changed from {old.admin.listen} to {new.admin.listen}: needs a restart "
                         f"(admin still on {old.admin.listen})")
            update["admin"] = new.admin.model_copy(update={"listen": old.admin.listen})
        if new.cache_dir != old.cache_dir:
            notes.append(f"cache_dir changed to {new.cache_dir}: needs a restart (still using {old.cache_dir})")
            update["cache_dir"] = old.cache_dir
        if new.access_log != old.access_log:
            notes.append(f"access_log changed to {new.access_log}: needs a restart")
            update["access_log"] = old.access_log
        for note in notes:
            log.warning("%s: %s", self.config_path, note)
        if update:
            new = new.model_copy(update=update)
        return new, notes

    def _collect_when_disposed(self, old: Generation) -> None:
        """Once `old` is disposed, run the cycle collector as a backstop.

        A released VM is closed and freed by reference counting as its last stream completes;
        this collection catches whatever of a replaced generation still sits in a reference
        cycle (a filter's Python-side objects, a callout closure). `sluice run` raises the
        collector's thresholds and freezes the start-up heap, so without it such leftovers
        could stay in memory indefinitely. A full collection of the proxy's heap takes about
        10 ms; swaps in a burst share one.
        """
        if old.disposed:
            self._schedule_collect()
            return
        chained = old.on_disposed

        def disposed(gen: Generation) -> None:
            if chained is not None:
                chained(gen)
            self._schedule_collect()

        old.on_disposed = disposed

    def _schedule_collect(self) -> None:
        if self._collect_handle is not None:
            return  # one collection for a burst of swaps
        loop = asyncio.get_running_loop()
        self._collect_handle = loop.call_later(COLLECT_DELAY_S, self._collect)

    def _collect(self) -> None:
        self._collect_handle = None
        started = time.perf_counter()
        if gc.get_freeze_count():
            # `sluice run` froze the start-up heap, the first generation included: thaw it, or
            # that generation's VMs could never be freed. It is not frozen again: whatever is
            # alive now (requests in flight, open connections) would leak if frozen once it
            # becomes cyclic garbage.
            gc.unfreeze()
        gc.collect()
        log.debug("collected retired generations in %.1f ms", (time.perf_counter() - started) * 1000)
