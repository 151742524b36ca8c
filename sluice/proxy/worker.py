"""One worker process of a fleet: `python -m sluice.proxy.worker` (started by sluice/proxy/supervisor.py).

A worker is a whole `Gateway` (filters, router, clusters) listening on the fleet's address with
SO_REUSEPORT, so the kernel spreads connections over the workers. It has no file watcher and no
public admin listener: its admin app (the same `AdminServer` routes as a single-process sluice)
answers on a private Unix socket in the supervisor's control directory, plus the `/fleet/...`
routes the supervisor drives:

* ``GET  /fleet/info``     pid, index, fleet version, generation, readiness;
* ``POST /fleet/prepare``  build a generation from a config snapshot off to the side (phase one of
  a fleet reload: nothing changes for requests yet);
* ``POST /fleet/commit``   make the prepared generation current (phase two);
* ``POST /fleet/abort``    discard it (some other worker failed to prepare).

A worker can also start as a warm spare (`--standby`): imports done, it waits for its arguments
on stdin; the supervisor keeps one so that a restart does not pay for interpreter start-up.

The worker ends (draining in-flight requests, exit 0) on SIGTERM/SIGINT, on `POST /drain`, and
when its stdin closes: the supervisor holds the other end, so a supervisor that died (even by
SIGKILL) does not leave workers behind.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path

import uvloop
from aiohttp import web

from sluice import abi

from .admin import AdminServer
from .app import Gateway, Generation, _setup_logging
from .config import ConfigError, HostPort, SluiceConfig, parse_config
from .redis_host import RedisCollector
from .sharing import SharedDataCollector, build_runtime

__all__ = ["FLEET_FIXED_SETTINGS", "FleetAgent", "load_snapshot", "main"]

log = logging.getLogger("sluice.worker")

FLEET_FIXED_SETTINGS = ("listen", "admin", "cache_dir", "access_log", "workers", "shared_data")
"""Settings a running fleet keeps across a reload (changing them needs a restart)."""


def load_snapshot(snapshot: Path, source: Path) -> SluiceConfig:
    """A config snapshot the supervisor wrote, read as if it were `source` (paths relative to it)."""
    return parse_config(snapshot.read_text(encoding="utf-8"), source=str(source), base_dir=source.resolve().parent)


@dataclasses.dataclass
class _Prepared:
    version: int
    generation: Generation


class FleetAgent:
    """The worker's side of a fleet reload: prepare a generation, then commit or abort it."""

    def __init__(self, gateway: Gateway, index: int, version: int) -> None:
        self.gateway = gateway
        self.index = index
        self.version = version
        """The fleet version (supervisor's reload count) this worker serves."""
        self._prepared: _Prepared | None = None
        self._lock = asyncio.Lock()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/fleet/info", self.info)
        app.router.add_post("/fleet/prepare", self.prepare)
        app.router.add_post("/fleet/commit", self.commit)
        app.router.add_post("/fleet/abort", self.abort)

    async def info(self, request: web.Request) -> web.StreamResponse:
        gw = self.gateway
        gen = gw.current_generation()
        return web.json_response(
            {
                "index": self.index,
                "pid": os.getpid(),
                "version": self.version,
                "generation": gen.number if gen is not None else None,
                "ready": gen is not None and gw.address is not None and not gw.draining,
                "draining": gw.draining,
                "requests_total": gw.stats.requests_total,
                "requests_active": gw.stats.requests_active,
                "filters": {f.name: f.report().module.sha256 for f in gen.filters} if gen is not None else {},
            }
        )

    async def prepare(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        async with self._lock:
            self._discard()
            running = self.gateway.generation
            try:
                config = load_snapshot(Path(body["snapshot"]), Path(body["source"]))
            except (OSError, ConfigError) as exc:
                errors = exc.errors if isinstance(exc, ConfigError) else [str(exc)]
                return web.json_response({"ok": False, "error": "; ".join(errors)})
            keep = {name: getattr(running.config, name) for name in FLEET_FIXED_SETTINGS}
            config = config.model_copy(update=keep)
            try:
                gen = await self.gateway.build_generation(config, previous=running)
            except abi.PluginLoadError as exc:
                return web.json_response({"ok": False, "error": f"{exc.path}: {exc.reason}"})
            except Exception as exc:  # e.g. a cluster pool that cannot be built
                return web.json_response({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            self._prepared = _Prepared(int(body["version"]), gen)
            return web.json_response({"ok": True, "generation": gen.number})

    async def commit(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        async with self._lock:
            prepared = self._prepared
            if prepared is None or prepared.version != int(body["version"]):
                return web.json_response({"ok": False, "error": "nothing prepared for this version"})
            self._prepared = None
            if self.gateway.draining:
                self._retire_unused(prepared.generation)
                return web.json_response({"ok": False, "error": "draining"})
            self.gateway.install(prepared.generation)
            self.version = prepared.version
            log.info("worker %d: fleet version %d, generation %d", self.index, self.version,
                     prepared.generation.number)
            return web.json_response({"ok": True, "generation": prepared.generation.number})

    async def abort(self, request: web.Request) -> web.StreamResponse:
        async with self._lock:
            self._discard()
        return web.json_response({"ok": True})

    def _discard(self) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            self._retire_unused(prepared.generation)

    def _retire_unused(self, gen: Generation) -> None:
        running = self.gateway.current_generation()
        keep = frozenset(id(f.plugin) for f in running.filters) if running is not None else frozenset()
        gen.retire(keep)


async def _serve(args: argparse.Namespace, config: SluiceConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The supervisor holds our stdin; EOF means it is gone.
    loop.add_reader(0, lambda: stop.set() if not os.read(0, 512) else None)
    listen = HostPort.parse(args.listen)
    runtime = build_runtime(config, worker=f"w{args.index}")
    gateway = Gateway(config, runtime=runtime)
    gateway.watch = False  # the supervisor watches and reloads the whole fleet
    gateway.server.reuse_port = True
    try:
        await gateway.start(listen.host, listen.port)
    except abi.PluginLoadError as exc:
        log.error("worker %d: cannot load filter: %s", args.index, exc)
        return 1
    except OSError as exc:
        log.error("worker %d: cannot listen on %s: %s", args.index, listen, exc.strerror or exc)
        return 1
    gateway.on_drain = stop.set
    admin = AdminServer(gateway)
    admin.registry.register(SharedDataCollector(lambda: runtime))
    admin.registry.register(RedisCollector(lambda: gateway.services.redis if gateway.services else None))
    FleetAgent(gateway, args.index, args.version).add_routes(admin.app)
    runner = web.AppRunner(admin.app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, args.control_socket).start()
    log.info("worker %d (pid %d) serving on %s", args.index, os.getpid(), listen)
    await stop.wait()
    await gateway.stop(config.drain_timeout)
    await runner.cleanup()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sluice.proxy.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", required=True, help="config snapshot written by the supervisor")
    parser.add_argument("--source", required=True, help="the config file the snapshot is of")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--version", type=int, required=True, help="fleet version of the snapshot")
    parser.add_argument("--listen", required=True, help="host:port (the supervisor resolved port 0)")
    parser.add_argument("--control-socket", required=True, help="Unix socket of the private admin app")
    return parser


def _read_line(fd: int) -> str:
    """One line from `fd`, unbuffered (what follows stays for the EOF watch on the same pipe)."""
    out = bytearray()
    while (byte := os.read(fd, 1)) not in (b"", b"\n"):
        out += byte
    return out.decode()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--standby"]:
        # A warm spare: everything is imported already; the supervisor sends the worker's
        # arguments when it needs a worker (a restart then skips interpreter start and imports).
        line = _read_line(0)
        if not line:
            return 0
        argv = json.loads(line)
    args = _parser().parse_args(argv)
    source = Path(args.source)
    try:
        config = load_snapshot(Path(args.snapshot), source)
    except (OSError, ConfigError) as exc:
        print(f"worker {args.index}: {exc}", file=sys.stderr)
        return 1
    _setup_logging(config)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[w{args.index}]: %(message)s"))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(args, config))


if __name__ == "__main__":
    sys.exit(main())
