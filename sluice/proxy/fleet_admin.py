"""The admin endpoint of a fleet (`workers: N`), served by the supervisor on `admin.listen`.

Same routes and access control as the single-process admin (sluice/proxy/admin.py, docs/admin.md),
answered by asking every worker over its private Unix socket and merging:

* ``/stats``    the workers' exports merged (sluice/proxy/fleet_metrics.py) plus the supervisor's
                own ``sluice_worker_*`` and ``sluice_fleet_reloads_total``;
* ``/ready``    200 only when every worker is running and ready; the body has each worker's answer;
* ``/filters``  per filter: the first worker's view with counters summed over all workers, and a
                ``workers`` map of each one's state, module sha256 and generation;
* ``/clusters`` per cluster: counters summed, each worker's view under ``workers``;
* ``/workers``  the supervisor's view of its workers (pid, state, restarts, fleet version);
* ``POST /reload`` the fleet reload (validate once, prepare all, commit all);
* ``GET/POST /logging`` forwarded to every worker; ``POST /drain`` drains the fleet.

The dashboard (``/``, ``/dashboard.json``) is not served by a fleet yet (404 says so).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sluice.abi import LogLevel

from .admin import _iso, admin_guard, listen_app, redact, requested_level
from .fleet_metrics import FleetCollector, merge_exports
from .logs import PYTHON_LEVELS

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger("sluice.admin")

_SUMMED_FILTER_COUNTERS = ("streams", "callbacks", "callback_seconds", "traps", "deadlines", "fail_closed",
                           "fail_open", "vm_reloads", "vm_reload_failures", "log_lines_suppressed")
_SUMMED_CLUSTER_COUNTERS = ("connects", "connect_failures", "reuses", "idle_connections")


class FleetAdmin:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.token = supervisor.config.admin.token
        self.collector = FleetCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None
        self.app = web.Application(middlewares=[admin_guard(lambda: self.token)], client_max_size=64 * 1024)
        for path, handler in (
            ("/ready", self.ready), ("/healthz", self.healthz), ("/stats", self.stats), ("/filters", self.filters),
            ("/clusters", self.clusters), ("/config", self.config), ("/workers", self.workers),
            ("/logging", self.logging_levels), ("/", self.no_dashboard), ("/dashboard.json", self.no_dashboard),
        ):
            self.app.router.add_get(path, handler)
        self.app.router.add_post("/reload", self.reload)
        self.app.router.add_post("/logging", self.set_logging)
        self.app.router.add_post("/drain", self.drain)

    async def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        listen = self.supervisor.config.admin.listen
        self._runner, self.address = await listen_app(
            self.app, host or listen.host, listen.port if port is None else port
        )
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- asking the workers ------------------------------------------------------------------------
    async def _ask(self, path: str, *, method: str = "GET", raw: bool = False) -> dict[str, Any]:
        """worker label -> body of the ones that answered 200."""
        answers = await self.supervisor.call_all(method, path, raw=raw)
        return {k: v[1] for k, v in answers.items() if not isinstance(v, BaseException) and v[0] == 200}

    # -- routes ------------------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n")

    async def no_dashboard(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": "the dashboard is not served with workers > 1; see /stats, /filters, /workers"}, status=404
        )

    async def ready(self, request: web.Request) -> web.StreamResponse:
        sup = self.supervisor
        if sup.draining:
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        answers = await sup.call_all("GET", "/ready")
        workers: dict[str, Any] = {}
        ready = len(answers) == sup.count
        for slot in sup.slots:
            answer = answers.get(slot.label)
            if answer is None or isinstance(answer, BaseException):
                workers[slot.label] = {"ready": False, "reason": slot.state.value}
                ready = False
            else:
                workers[slot.label] = answer[1]
                ready = ready and answer[0] == 200
        body: dict[str, Any] = {"ready": ready, "generation": sup.version, "workers": workers}
        if not ready:
            body["reason"] = "worker(s) not ready: " + ", ".join(k for k, v in workers.items() if not v.get("ready"))
        return web.json_response(body, status=200 if ready else 503)

    async def stats(self, request: web.Request) -> web.StreamResponse:
        exports = await self._ask("/stats", raw=True)
        merged = merge_exports(exports)
        sup = self.supervisor
        restarts = CounterMetricFamily("sluice_worker_restarts", "Worker processes restarted", labels=["worker"])
        up = GaugeMetricFamily("sluice_worker_up", "1 while the worker process runs and serves", labels=["worker"])
        for slot in sup.slots:
            restarts.add_metric([slot.label], slot.restarts)
            up.add_metric([slot.label], 1 if slot.label in exports else 0)
        reloads = CounterMetricFamily("sluice_fleet_reloads", "Fleet reload attempts", labels=["result"])
        for result, count in sup.reloads.items():
            reloads.add_metric([result], count)
        version = GaugeMetricFamily("sluice_fleet_version", "Config version the fleet serves")
        version.add_metric([], sup.version)
        self.collector.set([*merged, restarts, up, reloads, version])
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def filters(self, request: web.Request) -> web.StreamResponse:
        answers = await self._ask("/filters")
        out: dict[str, Any] = {}
        for worker, filters in answers.items():
            for name, info in filters.items():
                merged = out.get(name)
                if merged is None:
                    merged = out[name] = {**info, "counters": dict(info.get("counters", {})), "workers": {}}
                else:
                    for key in _SUMMED_FILTER_COUNTERS:
                        merged["counters"][key] = merged["counters"].get(key, 0) + info.get("counters", {}).get(key, 0)
                merged["workers"][worker] = {
                    k: info.get(k) for k in ("state", "sha256", "generation", "vm_count", "active_streams",
                                             "memory_bytes", "last_error")
                }
        return web.json_response(out)

    async def clusters(self, request: web.Request) -> web.StreamResponse:
        answers = await self._ask("/clusters")
        out: dict[str, Any] = {}
        for worker, clusters in answers.items():
            for name, info in clusters.items():
                merged = out.get(name)
                if merged is None:
                    merged = out[name] = {**info, "workers": {}}
                else:
                    for key in _SUMMED_CLUSTER_COUNTERS:
                        merged[key] = merged.get(key, 0) + info.get(key, 0)
                merged["workers"][worker] = info
        return web.json_response(out)

    async def config(self, request: web.Request) -> web.StreamResponse:
        config = self.supervisor.config
        data = redact(config.model_dump(mode="json"))
        return web.json_response({"source": str(config.source_path), "config": data})

    async def workers(self, request: web.Request) -> web.StreamResponse:
        sup = self.supervisor
        info = await self._ask("/fleet/info")
        return web.json_response({
            "count": sup.count,
            "version": sup.version,
            "listen": str(sup.listen),
            "workers": [
                {"index": s.index, "pid": s.pid, "state": s.state.value, "restarts": s.restarts,
                 "last_exit": s.last_exit, "info": info.get(s.label)}
                for s in sup.slots
            ],
        })

    async def reload(self, request: web.Request) -> web.StreamResponse:
        event = await self.supervisor.reload("admin")
        assert event is not None  # an admin reload always reports
        data = dataclasses.asdict(event)
        data["time_iso"] = _iso(event.time)
        return web.json_response(data, status=200 if event.ok else 500)

    async def logging_levels(self, request: web.Request) -> web.StreamResponse:
        answers = await self._ask("/logging")
        first: dict[str, Any] = next(iter(answers.values()), {})
        return web.json_response({**first, "workers": answers})

    async def set_logging(self, request: web.Request) -> web.StreamResponse:
        level = requested_level(request)
        if not isinstance(level, LogLevel):
            return level
        if request.query.get("filter") is None:
            logging.getLogger("sluice").setLevel(PYTHON_LEVELS[level])
        answers = await self.supervisor.call_all("POST", f"/logging?{request.query_string}")
        bodies = {k: v[1] for k, v in answers.items() if not isinstance(v, BaseException)}
        statuses = {v[0] for v in answers.values() if not isinstance(v, BaseException)}
        status = max(statuses) if statuses else 503
        first: dict[str, Any] = next(iter(bodies.values()), {})
        return web.json_response({**first, "workers": bodies}, status=status)

    async def drain(self, request: web.Request) -> web.StreamResponse:
        already = self.supervisor.draining
        if not already:
            log.info("drain requested through the admin API (all workers)")
        self.supervisor.drain()
        return web.json_response({"draining": True, "already": already, "time": time.time()}, status=202)
