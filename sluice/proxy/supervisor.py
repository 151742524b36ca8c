"""The supervisor of `workers: N` (N > 1): starts the worker processes, restarts a dead one,
reloads the fleet atomically, drains it on SIGTERM/SIGINT, and serves the one admin endpoint.

Worker model (docs/scaling.md):

* Each worker (`python -m sluice.proxy.worker`) binds the listen address itself with SO_REUSEPORT;
  the kernel spreads new connections over the workers' sockets. For `listen: ...:0` the supervisor
  binds the port first (without listening, so no connection is ever queued on it) and hands the
  number to every worker.
* The workers read the config from a snapshot the supervisor wrote into its control directory
  (a private temporary directory), so a worker restarted later runs what the fleet runs, not
  whatever the config file holds at that moment.
* A worker that exits while the fleet is not stopping is restarted after a backoff (0.1 s,
  doubling to 5 s; reset once a worker has lived 10 s); each restart is logged and counted
  (`sluice_worker_restarts_total{worker}`).
* Fleet reload (file change or `POST /reload`): the new config is loaded and every filter is
  loaded once here, as `sluice check` does; then every worker builds the new generation off to
  the side (prepare); only when all succeeded do they all swap (commit). Anything failing leaves
  every worker on the running version and is reported once (log line, `/reload` answer).
* SIGTERM/SIGINT or `POST /drain`: every worker gets SIGTERM and drains its in-flight requests;
  the supervisor exits 0 once they all have (workers still running after `drain_timeout` + 5 s
  are killed, and the exit status is 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import watchfiles

from .checking import check_filters
from .config import ConfigError, HostPort, SluiceConfig, load_config, resolve_workers
from .worker import FLEET_FIXED_SETTINGS

__all__ = ["FleetReloadEvent", "Supervisor", "WorkerSlot", "WorkerState"]

log = logging.getLogger("sluice.supervisor")

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
STABLE_AFTER_S = 10.0
"""A worker that lived this long restarts with the first backoff again."""
READY_TIMEOUT_S = 60.0
SETTLE_S = 0.1
"""A changed file must keep its size and mtime this long before a reload reads it."""
WORKER_CALL_TIMEOUT_S = 30.0


class WorkerState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclasses.dataclass
class WorkerSlot:
    """One worker index; its process changes across restarts."""

    index: int
    socket: Path
    process: asyncio.subprocess.Process | None = None
    state: WorkerState = WorkerState.STARTING
    started_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    backoff_s: float = BACKOFF_FIRST_S

    @property
    def label(self) -> str:
        return str(self.index)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


@dataclasses.dataclass(frozen=True)
class FleetReloadEvent:
    """One fleet reload attempt (the fields of `reload.ReloadEvent`, `generation` = fleet version)."""

    time: float
    trigger: str
    ok: bool
    generation: int
    changed: list[str]
    error: str | None
    duration_ms: float
    notes: list[str] = dataclasses.field(default_factory=list)


def _restart_notes(old: SluiceConfig, new: SluiceConfig) -> list[str]:
    return [
        f"{name} changed: needs a restart (the fleet keeps the running value)"
        for name in FLEET_FIXED_SETTINGS
        if getattr(old, name) != getattr(new, name)
    ]


def _reserve_port(listen: HostPort) -> tuple[socket.socket | None, HostPort]:
    """For port 0, bind (not listen) a SO_REUSEPORT socket to learn a port all workers can share."""
    if listen.port != 0:
        return None, listen
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((listen.host, 0))
    return sock, HostPort(listen.host, int(sock.getsockname()[1]))


class Supervisor:
    def __init__(self, config: SluiceConfig, workers: int | None = None) -> None:
        if config.source_path is None:
            raise ValueError("a fleet needs a config file (workers read snapshots of it)")
        self.config = config
        self.config_path = config.source_path
        self.count = workers if workers is not None else resolve_workers(config.workers)
        self.control = Path(tempfile.mkdtemp(prefix="sluice-fleet-"))
        os.chmod(self.control, 0o700)
        self.slots = [WorkerSlot(i, self.control / f"w{i}.sock") for i in range(self.count)]
        self.version = 1
        """Fleet version: 1 at start, +1 per successful reload."""
        self.hashes: dict[str, str] = {}
        self.events: list[FleetReloadEvent] = []
        self.reloads = {"ok": 0, "failed": 0}
        self.draining = False
        self.stopped = asyncio.Event()
        self.exit_status = 0
        """0 once every worker drained and exited cleanly; 1 if one had to be killed or failed."""
        self.listen = config.listen
        self._reserved: socket.socket | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher_stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._sessions: dict[int, aiohttp.ClientSession] = {}
        self._standby: asyncio.subprocess.Process | None = None
        self._standby_starting = False

    # -- snapshots ---------------------------------------------------------------------------------
    def snapshot_path(self, version: int) -> Path:
        return self.control / f"config-{version}.yaml"

    def _write_snapshot(self, version: int, text: str) -> Path:
        path = self.snapshot_path(version)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return path

    # -- talking to workers ------------------------------------------------------------------------
    def _client(self, slot: WorkerSlot) -> aiohttp.ClientSession:
        session = self._sessions.get(slot.index)
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(slot.socket)),
                timeout=aiohttp.ClientTimeout(total=WORKER_CALL_TIMEOUT_S),
                headers=self._auth_headers(),
            )
            self._sessions[slot.index] = session
        return session

    def _auth_headers(self) -> dict[str, str]:
        token = self.config.admin.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def call(
        self, slot: WorkerSlot, method: str, path: str, *, json: Any = None, raw: bool = False
    ) -> tuple[int, Any]:
        """One request to a worker's private admin app: (status, JSON body or text)."""
        async with self._client(slot).request(method, f"http://localhost{path}", json=json) as response:
            body: Any = await response.text() if raw else await response.json(content_type=None)
            return response.status, body

    def running(self) -> list[WorkerSlot]:
        return [s for s in self.slots if s.state is WorkerState.RUNNING]

    async def call_all(
        self, method: str, path: str, *, json: Any = None, raw: bool = False, slots: Iterable[WorkerSlot] | None = None
    ) -> dict[str, tuple[int, Any] | BaseException]:
        chosen = list(slots) if slots is not None else self.running()
        results = await asyncio.gather(
            *(self.call(s, method, path, json=json, raw=raw) for s in chosen), return_exceptions=True
        )
        return {s.label: r for s, r in zip(chosen, results, strict=True)}

    # -- starting and restarting -------------------------------------------------------------------
    async def start(self) -> None:
        """Validate the config's filters once, start every worker and wait until all are ready.

        Raises RuntimeError with the reason if the filters do not load or a worker does not start.
        """
        loop = asyncio.get_running_loop()
        checked = await loop.run_in_executor(None, check_filters, self.config)
        if checked.problems:
            raise RuntimeError("; ".join(checked.problems))
        self.hashes = checked.hashes
        self._write_snapshot(self.version, self.config_path.read_text(encoding="utf-8"))
        listen = self.config.listen
        assert isinstance(listen, HostPort), "the config check refuses a list of listeners with workers > 1"
        self._reserved, self.listen = _reserve_port(listen)
        results = await asyncio.gather(*(self._spawn(slot) for slot in self.slots), return_exceptions=True)
        failed = [f"worker {s.index}: {r}" for s, r in zip(self.slots, results, strict=True) if r is not None]
        if failed:
            await self.stop()
            raise RuntimeError("; ".join(failed))
        for slot in self.slots:
            self._spawn_task(self._watch_worker(slot))
        self._spawn_task(self._watch_files())

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, slot: WorkerSlot) -> str | None:
        """Start the worker of `slot` and wait until it answers; None on success, else why not."""
        slot.state = WorkerState.STARTING
        with contextlib.suppress(FileNotFoundError):
            slot.socket.unlink()
        args = [
            "--snapshot", str(self.snapshot_path(self.version)),
            "--source", str(self.config_path),
            "--index", str(slot.index),
            "--version", str(self.version),
            "--listen", str(self.listen),
            "--control-socket", str(slot.socket),
        ]
        standby, self._standby = self._standby, None
        if standby is not None and standby.returncode is None and standby.stdin is not None:
            standby.stdin.write(json.dumps(args).encode() + b"\n")
            slot.process = standby
        else:
            slot.process = await self._worker_process(args)
        if not self.draining:
            self._spawn_task(self._prepare_standby())
        slot.started_at = time.monotonic()
        deadline = slot.started_at + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if slot.process.returncode is not None:
                slot.last_exit = slot.process.returncode
                slot.state = WorkerState.BACKOFF
                return f"exited with status {slot.process.returncode} while starting"
            if slot.socket.exists():
                try:
                    status, body = await self.call(slot, "GET", "/fleet/info")
                except (aiohttp.ClientError, OSError, TimeoutError):
                    status, body = 0, None
                if status == 200 and body.get("ready"):
                    slot.state = WorkerState.RUNNING
                    return None
            await asyncio.sleep(0.02)
        return f"not ready after {READY_TIMEOUT_S:g}s"

    @staticmethod
    async def _worker_process(args: list[str]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sluice.proxy.worker", *args, stdin=asyncio.subprocess.PIPE
        )

    async def _prepare_standby(self) -> None:
        """Start the warm spare the next restart will use (one at a time)."""
        if self._standby is None and not self._standby_starting:
            self._standby_starting = True
            try:
                self._standby = await self._worker_process(["--standby"])
            finally:
                self._standby_starting = False

    async def _watch_worker(self, slot: WorkerSlot) -> None:
        while not self.draining:
            process = slot.process
            assert process is not None
            status = await process.wait()
            if self.draining:
                break
            slot.last_exit = status
            slot.state = WorkerState.BACKOFF
            lived = time.monotonic() - slot.started_at
            if lived >= STABLE_AFTER_S:
                slot.backoff_s = BACKOFF_FIRST_S
            delay = slot.backoff_s
            slot.backoff_s = min(slot.backoff_s * 2, BACKOFF_MAX_S)
            slot.restarts += 1
            log.warning(
                "worker %d (pid %d) exited with status %d after %.1fs; restarting in %.1fs (restart %d)",
                slot.index, process.pid, status, lived, delay, slot.restarts,
            )
            await asyncio.sleep(delay)
            if self.draining:
                break
            async with self._lock:  # a restarted worker starts on the version the fleet runs
                why = await self._spawn(slot)
            if why is not None:
                log.error("worker %d: %s", slot.index, why)
                if slot.process is not None and slot.process.returncode is None:
                    slot.process.kill()
            else:
                log.info("worker %d restarted (pid %s)", slot.index, slot.pid)
        slot.state = WorkerState.STOPPED if slot.process is None or slot.process.returncode is not None else slot.state

    # -- fleet reload ------------------------------------------------------------------------------
    async def reload(self, trigger: str = "admin", changed: Iterable[Path] = ()) -> FleetReloadEvent | None:
        """Load, validate once, prepare everywhere, then commit everywhere (or abort everywhere).

        Returns None when a file change changed nothing (same config, same module bytes).
        """
        names = sorted(str(p) for p in changed)
        async with self._lock:
            started = time.perf_counter()
            loop = asyncio.get_running_loop()

            def failed(error: str) -> FleetReloadEvent:
                event = FleetReloadEvent(
                    time.time(), trigger, False, self.version, names, error, (time.perf_counter() - started) * 1000
                )
                log.error("fleet reload failed (%s), every worker stays on version %d: %s",
                          trigger, self.version, error)
                self.reloads["failed"] += 1
                self.events.append(event)
                return event

            if self.draining:
                return failed("the proxy is shutting down")
            try:
                text = self.config_path.read_text(encoding="utf-8")
                config = await loop.run_in_executor(None, load_config, self.config_path)
            except OSError as exc:
                return failed(f"{self.config_path}: {exc.strerror or exc}")
            except ConfigError as exc:
                return failed("; ".join(exc.errors))
            checked = await loop.run_in_executor(None, check_filters, config)
            if checked.problems:
                return failed("; ".join(checked.problems))
            hashes = checked.hashes
            if trigger != "admin" and config == self.config and hashes == self.hashes:
                return None
            notes = _restart_notes(self.config, config)
            for note in notes:
                log.warning("%s: %s", self.config_path, note)
            version = self.version + 1
            snapshot = self._write_snapshot(version, text)
            request = {"snapshot": str(snapshot), "source": str(self.config_path), "version": version}
            slots = self.running()
            prepared = await self.call_all("POST", "/fleet/prepare", json=request, slots=slots)
            errors = []
            for label, result in prepared.items():
                if isinstance(result, BaseException):
                    errors.append(f"worker {label}: {type(result).__name__}: {result}")
                elif result[0] != 200 or not result[1].get("ok"):
                    errors.append(f"worker {label}: {result[1].get('error') if result[0] == 200 else result}")
            if errors or len(slots) != self.count:
                await self.call_all("POST", "/fleet/abort", slots=slots)
                snapshot.unlink(missing_ok=True)
                if len(slots) != self.count:
                    errors.append(f"{self.count - len(slots)} worker(s) not running")
                return failed("; ".join(errors))
            committed = await self.call_all("POST", "/fleet/commit", json={"version": version}, slots=slots)
            self.snapshot_path(self.version).unlink(missing_ok=True)
            self.version = version
            self.config = config.model_copy(update={k: getattr(self.config, k) for k in FLEET_FIXED_SETTINGS})
            self.hashes = hashes
            lost = [label for label, r in committed.items() if isinstance(r, BaseException) or not r[1].get("ok")]
            if lost:
                # A worker that died between prepare and commit restarts on the new snapshot.
                notes.append(f"worker(s) {', '.join(lost)} did not confirm the swap (restarting)")
            event = FleetReloadEvent(
                time.time(), trigger, True, version, names, None, (time.perf_counter() - started) * 1000, notes
            )
            log.info("fleet reloaded (%s%s): version %d on %d workers in %.0f ms", trigger,
                     f": {', '.join(names)}" if names else "", version, len(slots), event.duration_ms)
            self.reloads["ok"] += 1
            self.events.append(event)
            del self.events[:-100]
            return event

    def _interesting(self) -> set[Path]:
        return {self.config_path, *(Path(entry.module_path) for entry in self.config.chain)}

    async def _watch_files(self) -> None:
        while not self._watcher_stop.is_set():
            watched = self._interesting()
            dirs = sorted({p.parent for p in watched if p.parent.is_dir()})

            def interesting(_change: watchfiles.Change, path: str, watched: set[Path] = watched) -> bool:
                return Path(path) in watched

            async for changes in watchfiles.awatch(
                *dirs, step=10, stop_event=self._watcher_stop, recursive=False, watch_filter=interesting
            ):
                changed = {Path(p) for _, p in changes} & watched
                if not changed:
                    continue
                await self._settle(changed)
                trigger = "config" if self.config_path in changed else "file"
                try:
                    await self.reload(trigger, changed)
                except Exception:
                    log.exception("fleet reload failed unexpectedly")
                if self._interesting() != watched:
                    break  # the chain moved: watch the new directories

    @staticmethod
    async def _settle(paths: set[Path]) -> None:
        """Wait until the changed files keep their size and mtime for SETTLE_S (a copy in progress)."""

        def stats() -> list[tuple[int, int] | None]:
            out: list[tuple[int, int] | None] = []
            for p in sorted(paths):
                try:
                    st = p.stat()
                    out.append((st.st_size, st.st_mtime_ns))
                except OSError:
                    out.append(None)
            return out

        before = stats()
        for _ in range(100):
            await asyncio.sleep(SETTLE_S)
            now = stats()
            if now == before:
                return
            before = now

    # -- stopping ----------------------------------------------------------------------------------
    def drain(self) -> None:
        """Begin the graceful shutdown of every worker (SIGTERM, `POST /drain`)."""
        if self.draining:
            return
        self.draining = True
        self._spawn_task(self.stop())

    async def stop(self) -> int:
        """SIGTERM every worker and wait for them to drain; 0 if all exited cleanly in time."""
        self.draining = True
        self._watcher_stop.set()
        standby, self._standby = self._standby, None
        if standby is not None and standby.stdin is not None:
            standby.stdin.close()  # EOF: the spare exits without serving
            await standby.wait()
        procs = [s.process for s in self.slots if s.process is not None and s.process.returncode is None]
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.state = WorkerState.STOPPING
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signal.SIGTERM)
        status = 0
        limit = self.config.drain_timeout + 5.0
        for proc in procs:
            try:
                code = await asyncio.wait_for(proc.wait(), limit)
            except TimeoutError:
                log.error("worker pid %d did not drain in %.0fs: killed", proc.pid, limit)
                proc.kill()
                code = await proc.wait()
            if code != 0:
                status = 1
        for slot in self.slots:
            slot.state = WorkerState.STOPPED
        for session in self._sessions.values():
            await session.close()
        if self._reserved is not None:
            self._reserved.close()
        shutil.rmtree(self.control, ignore_errors=True)
        self.exit_status = status
        self.stopped.set()
        return status
