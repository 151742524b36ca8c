"""The running proxy: `Gateway`, one per process (the loaded config lives in sluice/proxy/generation.py).

`Gateway` owns the listener, the current `Generation` and the ones retiring, the filter runtime,
the `Services` host and the counters; it implements the read-only `ProxyView` that the admin API
and `/stats` read (sluice/proxy/view.py).

`serve(config)` is the `sluice run` entry point: uvloop, signals, graceful drain.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sluice import abi

from .admin import AdminServer
from .config import SluiceConfig
from .downstream_h2 import H2Listener
from .generation import Generation, LoadedFilter, load_generation
from .http2.events import H2Limits
from .listener import TlsListener
from .logs import AccessLog, AccessLogError
from .redirect import HttpsRedirect
from .redis_host import RedisCollector
from .reload import Reloader
from .reloadevents import ReloadHistory
from .server import ProxyServer
from .services import Services
from .sharing import SharedDataCollector, build_runtime
from .stats import ProxyStats
from .tls.certs import CertificateError
from .tls.server import ServerTls

__all__ = ["Gateway", "Generation", "LoadedFilter", "serve"]

log = logging.getLogger("sluice")


class Gateway:
    """The proxy: listener, current generation, filter runtime, services, stats."""

    def __init__(self, config: SluiceConfig, *, runtime: abi.Runtime | None = None) -> None:
        self.config = config
        self.stats = ProxyStats()
        self._runtime = runtime
        self._own_runtime = runtime is None
        self._generation: Generation | None = None
        self._numbers = itertools.count(1)
        self.retiring: set[Generation] = set()
        self.services: Services | None = None
        self.server = ProxyServer(self._current, self.stats, max_request_header_size=config.max_request_header_size)
        self.address: tuple[str, int] | None = None
        """The first listener's address."""
        self.addresses: list[tuple[str, int]] = []
        """Every listener's, in `listen` order."""
        self.draining = False
        self.on_drain: Callable[[], None] | None = None
        """Begins shutdown; `sluice run` sets it to what SIGTERM does. `drain()` (admin) calls it."""
        self.reloader: Reloader | None = None
        """Hot reload (sluice/proxy/reload.py): runs when the config came from a file (`watch=True`)."""
        self.watch = config.source_path is not None

    def current_generation(self) -> Generation | None:
        """The generation serving new requests, or None before `start()`."""
        return self._generation

    def retiring_generations(self) -> list[Generation]:
        return list(self.retiring)

    def reload_history(self) -> ReloadHistory | None:
        return self.reloader.history if self.reloader is not None else None

    def suppressed_log_lines(self, filter_name: str) -> int:
        services = self.services
        return services.filter_logs.suppressed_total.get(filter_name, 0) if services is not None else 0

    # -- TLS listeners ---------------------------------------------------------------------------
    def tls_listeners(self) -> list[TlsListener]:
        return self.server.tls_listeners

    def http2_listeners(self) -> list[H2Listener]:
        return self.server.http2_listeners

    def certificate_files(self) -> set[Path]:
        """Every file a TLS listener reads (pairs, client CA): watched by hot reload."""
        return {path for t in self.server.tls_listeners for path in t.tls.watched_paths()}

    def reload_certificates(self) -> list[str]:
        """Re-read the listeners' certificate files (a broken pair keeps the running one); the errors."""
        return [error for t in self.server.tls_listeners for error in t.reload_certificates()]

    def drain(self) -> None:
        """Begin graceful shutdown (`POST /drain`): /ready answers 503 from now on."""
        self.draining = True
        if self.on_drain is not None:
            self.on_drain()

    # -- generations -----------------------------------------------------------------------------
    @property
    def generation(self) -> Generation:
        return self._current()

    def _current(self) -> Generation:
        # What `generation` answers, without the property's extra call: this runs for every request.
        generation = self._generation
        if generation is None:
            raise RuntimeError("gateway not started")
        return generation

    @property
    def runtime(self) -> abi.Runtime:
        if self._runtime is None:
            self._runtime = build_runtime(self.config)
        return self._runtime

    async def build_generation(self, config: SluiceConfig, previous: Generation | None = None) -> Generation:
        """Compile and load every filter of `config` (see `generation.load_generation`)."""
        assert self.services is not None, "start() first"
        self.services.redis.learn(config.clusters)  # filters may proxy_redis_init them while configuring
        return await load_generation(next(self._numbers), config, lambda: self.runtime, self.services, previous)

    def install(self, gen: Generation) -> Generation | None:
        """Make `gen` current (atomically for requests); retire the previous one. Returns it."""
        old, self._generation = self._generation, gen
        self.config = gen.config
        if old is not None:
            keep = frozenset(id(f.plugin) for f in gen.filters)
            self.retiring.add(old)
            old.on_disposed = self.retiring.discard
            old.retire(keep)
        return old

    def snapshot(self) -> dict[str, Any]:
        """Everything an admin endpoint shows: counters, clusters, filters, generations."""
        gen = self._generation
        out: dict[str, Any] = {"stats": self.stats.snapshot(), "generation": None}
        if self.server.http2_listeners:
            out["http2"] = {h.name: h.counters.snapshot() for h in self.server.http2_listeners}
        if gen is None:
            return out
        out["generation"] = {"number": gen.number, "active_requests": gen.active}
        out["retiring_generations"] = [
            {"number": g.number, "active_requests": g.active} for g in self.retiring_generations()
        ]
        out["clusters"] = {
            name: {
                "connects": pool.connects,
                "connect_failures": pool.connect_failures,
                "reuses": pool.reuses,
                "idle_connections": pool.idle_connections(),
                "endpoints": [
                    {"address": e.label, "failures": e.failures, "healthy": e.healthy(time.monotonic())}
                    for e in pool.endpoints
                ],
            }
            for name, pool in gen.clusters.items()
        }
        out["filters"] = [
            {
                "name": f.name,
                "match": f.match,
                "state": report.state.value,
                "active_streams": report.active_streams,
                "vm_count": report.vm_count,
            }
            for f, report in ((f, f.report()) for f in gen.filters)
        ]
        if self.services is not None:
            out["callouts"] = {"calls": self.services.calls, "failures": self.services.call_failures}
        return out

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """Load the config's filters and listen (default: `config.listen`; port 0 = any)."""
        self.services = Services(lambda: self._generation, asyncio.get_running_loop())
        self.install(await self.build_generation(self.config))
        if self.config.access_log is not None and self.server.access_log is None:
            self.server.access_log = AccessLog.open(self.config.access_log)
        # Every TLS listener's certificates load before anything listens: a bad pair stops the start.
        listeners = [(entry, ServerTls(entry.tls.settings()) if entry.tls else None) for entry in self.config.listeners]
        for position, (entry, tls) in enumerate(listeners):
            listen_host = host if host is not None and position == 0 else entry.address.host
            listen_port = port if port is not None and position == 0 else entry.address.port
            redirect = HttpsRedirect(entry.redirect.https_port, entry.redirect.status) if entry.redirect else None
            self.addresses.append(
                await self.server.start(
                    listen_host, listen_port, tls, redirect, h2c=entry.h2c, http2=H2Limits(**entry.http2_overrides)
                )
            )
        self.address = self.addresses[0]
        if self.watch and self.config.source_path is not None and self.reloader is None:
            self.reloader = Reloader(self, self.config.source_path)
            await self.reloader.start()
        return self.address

    @property
    def port(self) -> int:
        assert self.address is not None
        return self.address[1]

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to `drain_timeout`), release all."""
        self.draining = True
        if self.reloader is not None:
            await self.reloader.stop()
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        await self.server.shutdown(timeout)
        if self._generation is not None:
            self._generation.retire()
        for gen in list(self.retiring):
            gen.retire()
        if self.services is not None:
            self.services.close()
        if self._own_runtime and self._runtime is not None:
            self._runtime.close()


# -- sluice run ------------------------------------------------------------------------------------


def _setup_logging(config: SluiceConfig) -> None:
    # The access log is not a `logging` logger: `Gateway.start` opens its buffered writer.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


async def _run(config: SluiceConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(config)
    try:
        host, port = await gateway.start()
    except abi.PluginLoadError as exc:
        log.error("cannot load filter: %s", exc)
        return 1
    except AccessLogError as exc:
        log.error("%s", exc.strerror)
        return 1
    except CertificateError as exc:
        log.error("cannot load a listener certificate: %s", exc)
        return 1
    except OSError as exc:
        log.error("cannot listen on %s: %s", ", ".join(map(str, config.listeners)), exc.strerror or exc)
        return 1
    gateway.on_drain = stop.set  # POST /drain takes the SIGTERM path
    admin = AdminServer(gateway)
    admin.registry.register(SharedDataCollector(lambda: gateway.runtime if gateway.config.chain else None))
    admin.registry.register(RedisCollector(lambda: gateway.services.redis if gateway.services else None))
    try:
        admin_host, admin_port = await admin.start()
    except OSError as exc:
        log.error("cannot listen on %s (admin): %s", config.admin.listen, exc.strerror or exc)
        await gateway.stop(0)
        return 1
    log.info("admin API on http://%s:%d/", admin_host, admin_port)
    # Everything loaded so far (config, modules, VMs) lives until shutdown: keep it out of the
    # collector's scans, and collect young objects less often (requests allocate a lot of
    # short-lived ones). Both cut tail latency, not throughput.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    log.info("sluice listening on %s:%d (%d filters, %d routes)", host, port, len(config.chain), len(config.routes))
    await stop.wait()
    log.info("shutting down: draining in-flight requests (up to %gs)", config.drain_timeout)
    await gateway.stop(config.drain_timeout)
    await admin.stop()
    log.info("stopped")
    return 0


def serve(config: SluiceConfig) -> int:
    """Run the proxy until SIGTERM/SIGINT; drain and return the exit code."""
    _setup_logging(config)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
        return asyncio.run(_run(config))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(config))
