"""`sluice run` with `workers` > 1: the supervisor (sluice/proxy/supervisor.py) and the fleet's
admin endpoint (sluice/proxy/fleet_admin.py), until SIGTERM/SIGINT or `POST /drain`."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop

from .config import SluiceConfig
from .fleet_admin import FleetAdmin
from .supervisor import Supervisor

__all__ = ["serve_fleet"]

log = logging.getLogger("sluice.supervisor")


async def _run(config: SluiceConfig) -> int:
    loop = asyncio.get_running_loop()
    supervisor = Supervisor(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.drain)
    try:
        await supervisor.start()
    except RuntimeError as exc:
        log.error("cannot start the workers: %s", exc)
        return 1
    admin = FleetAdmin(supervisor)
    try:
        host, port = await admin.start()
    except OSError as exc:
        log.error("cannot listen on %s (admin): %s", config.admin.listen, exc.strerror or exc)
        await supervisor.stop()
        return 1
    log.info("admin API on http://%s:%d/", host, port)
    log.info("sluice listening on %s with %d workers (%d filters, %d routes)",
             supervisor.listen, supervisor.count, len(config.chain), len(config.routes))
    await supervisor.stopped.wait()
    await admin.stop()
    log.info("stopped")
    return supervisor.exit_status


def serve_fleet(config: SluiceConfig) -> int:
    """`sluice run` with `workers` > 1: run the supervisor until SIGTERM/SIGINT or `POST /drain`."""
    from .app import _setup_logging

    _setup_logging(config)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(config))
