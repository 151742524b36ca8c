"""The admin endpoint: health, readiness, Prometheus stats, filters, clusters, config, reload,
log levels, drain, and a self-refreshing HTML dashboard. Its own aiohttp listener, default
127.0.0.1:9901 (`admin.listen`). Endpoint reference: docs/admin.md.

Access control:

* with `admin.token` configured, every request needs ``Authorization: Bearer <token>`` (compared in
  constant time), on loopback too; 401 otherwise. Config validation refuses a non-loopback
  `admin.listen` without a token.
* without a token (loopback only), the `Host` header must name localhost or an IP address, so a web
  page cannot reach the API through DNS rebinding.
* POSTs carrying a cross-origin `Origin` (or `Sec-Fetch-Site: cross-site/same-site`) are refused
  with 403: a page in the operator's browser cannot reload or drain the proxy.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import importlib.resources
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sluice.abi import LogLevel
from sluice.histogram import HistogramSnapshot

from .generation import LoadedFilter
from .logs import PYTHON_LEVELS, FilterLogs
from .metrics import make_registry
from .reloadevents import ReloadEvent, ReloadTrigger
from .tls.export import certs_json
from .view import ProxyControl

log = logging.getLogger("sluice.admin")

REDACTED = "<redacted>"
_SECRET_WORDS = frozenset(
    {"key", "keys", "apikey", "apikeys", "secret", "secrets", "token", "tokens", "password", "passwords",
     "passwd", "passphrase", "credential", "credentials", "authorization", "private", "privatekey"}
)
"""A config key is secret when one of its words (split at `_`, `-`, `.`, spaces and camelCase) is one
of these: `api_keys`, `key`, `jwt_secret`, `token`, `password`, `clientSecret`..."""
_WORD_RE = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")

RATE_WINDOW_S = 10.0
"""The dashboard's request rate is averaged over this window."""

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_secret_key(key: str) -> bool:
    """Whether a config key names a secret (case-insensitive; `api_keys`, `jwt_secret`, `token`...)."""
    words = [w.lower() for w in _WORD_RE.findall(key)]
    return any(w in _SECRET_WORDS for w in words) or "".join(words) in _SECRET_WORDS


def redact(value: Any) -> Any:
    """A copy of JSON-like data with the value of every secret-named key, at any depth, replaced."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if value_present(v) else v) if is_secret_key(str(k)) else redact(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def value_present(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _host_is_local(host_header: str) -> bool:
    """`Host` names localhost or an IP literal (not a DNS name an attacker could rebind)."""
    try:
        host = urlsplit(f"//{host_header}").hostname or ""
    except ValueError:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _p99_le_us(snapshot: HistogramSnapshot) -> float | str | None:
    """The bound (µs) at or below which 99% of the observations fall; "inf" past the last bound."""
    p99 = snapshot.quantile(0.99)
    if p99 is None:
        return None
    below_last = snapshot.cumulative()[-2][1] if snapshot.bounds else 0
    if below_last < 0.99 * snapshot.count:  # the +Inf bucket holds the 99th percentile
        return "inf"
    return round(p99 * 1e6, 2)


class AdminServer:
    """The admin listener of one proxy (`Gateway`, through the `ProxyControl` view)."""

    def __init__(self, gateway: ProxyControl, *, token: str | None = None) -> None:
        self.gateway = gateway
        admin = gateway.config.admin
        self.token = token if token is not None else admin.token
        self.registry, self.collector = make_registry(gateway)
        self.started = time.time()
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None
        self._dashboard: bytes | None = None
        self._rate_samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self._rate_samples.append((time.monotonic(), gateway.stats.requests_total))
        self.app = self._make_app()

    # -- lifecycle -------------------------------------------------------------------------------
    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[admin_guard(lambda: self.token)], client_max_size=64 * 1024)
        app.router.add_get("/", self.dashboard)
        app.router.add_get("/dashboard.json", self.dashboard_json)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/filters", self.filters)
        app.router.add_get("/clusters", self.clusters)
        app.router.add_get("/certs", self.certs)
        app.router.add_get("/config", self.config)
        app.router.add_post("/reload", self.reload)
        app.router.add_get("/logging", self.logging_levels)
        app.router.add_post("/logging", self.set_logging)
        app.router.add_post("/drain", self.drain)
        return app

    async def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """Listen on `admin.listen` (or `host`/`port`; port 0 = any free port)."""
        listen = self.gateway.config.admin.listen
        self._runner, self.address = await listen_app(
            self.app, host if host is not None else listen.host, listen.port if port is None else port
        )
        return self.address

    @property
    def port(self) -> int:
        assert self.address is not None
        return self.address[1]

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- health --------------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n")

    async def ready(self, request: web.Request) -> web.StreamResponse:
        gw = self.gateway
        gen = gw.current_generation()
        if gw.draining:
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        if gen is None or gw.address is None:
            return web.json_response({"ready": False, "reason": "starting"}, status=503)
        return web.json_response(
            {"ready": True, "generation": gen.number, "filters": {f.name: f.report().state.value for f in gen.filters}}
        )

    # -- stats ---------------------------------------------------------------------------------
    async def stats(self, request: web.Request) -> web.StreamResponse:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- filters, clusters, config ---------------------------------------------------------------
    def _filter_info(self, f: LoadedFilter) -> dict[str, Any]:
        report = f.report()
        module = report.module
        counts = report.counters
        return {
            "name": f.name,
            "module": module.path,
            "sha256": module.sha256,
            "abi_version": module.abi_version,
            "unknown_imports": list(module.unknown_imports),
            "generation": f.generation,
            "loaded_at": _iso(f.loaded_at),
            "state": report.state.value,
            "last_error": report.last_error,
            "failure_policy": f.config.failure_policy,
            "match": f.match,
            "log_level": report.log_level.name.lower(),
            "vm_count": report.vm_count,
            "memory_bytes": report.memory_bytes,
            "active_streams": report.active_streams,
            "counters": {
                "streams": counts.streams,
                "callbacks": counts.callbacks,
                "callback_seconds": report.callback_seconds.sum,
                "traps": counts.traps,
                "deadlines": counts.deadlines,
                "fail_closed": counts.fail_closed,
                "fail_open": counts.fail_open,
                "vm_reloads": counts.reloads,
                "vm_reload_failures": counts.reload_failures,
                "log_lines_suppressed": self.gateway.suppressed_log_lines(f.name),
                "refused": dict(counts.refused),
            },
            "metrics": {m.name: m.value for m in report.metrics},
        }

    def _filters(self) -> list[LoadedFilter]:
        gen = self.gateway.current_generation()
        return list(gen.filters) if gen is not None else []

    async def filters(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({f.name: self._filter_info(f) for f in self._filters()})

    def _clusters(self) -> dict[str, Any]:
        gen = self.gateway.current_generation()
        now = time.monotonic()
        out: dict[str, Any] = {}
        for name, pool in (gen.clusters if gen is not None else {}).items():
            out[name] = {
                "endpoints": [
                    {
                        "address": e.label,
                        "healthy": e.healthy(now),
                        "failures": e.failures,
                        "down_for_s": round(max(e.down_until - now, 0.0), 3),
                        "idle_connections": len(e.idle),
                    }
                    for e in pool.endpoints
                ],
                "connects": pool.connects,
                "connect_failures": pool.connect_failures,
                "reuses": pool.reuses,
                "idle_connections": pool.idle_connections(),
                "max_connections": pool.max_connections,
            }
        return out

    async def clusters(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._clusters())

    async def certs(self, request: web.Request) -> web.StreamResponse:
        """Each TLS listener's certificates (names, expiry) and the errors of its last reload."""
        return web.json_response(certs_json({t.name: t.tls for t in self.gateway.tls_listeners()}))

    async def config(self, request: web.Request) -> web.StreamResponse:
        config = self.gateway.config
        data = redact(config.model_dump(mode="json"))
        source = config.source_path
        return web.json_response({"source": str(source) if source else None, "config": data})

    # -- actions -----------------------------------------------------------------------------------
    async def reload(self, request: web.Request) -> web.StreamResponse:
        reloader = self.gateway.reloader
        if reloader is None:
            return web.json_response(
                {"ok": False, "error": "hot reload is not enabled in this process (no reloader)"}, status=503
            )
        try:
            event = await reloader.reload(ReloadTrigger.ADMIN)
        except Exception as exc:
            log.exception("admin reload failed")
            return web.json_response({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, status=500)
        body = _event_json(event)
        return web.json_response(body, status=200 if event.ok else 500)

    def _levels(self) -> dict[str, Any]:
        sluice = logging.getLogger("sluice")
        return {
            "sluice": logging.getLevelName(sluice.getEffectiveLevel()).lower(),
            "filters": {f.name: f.report().log_level.name.lower() for f in self._filters()},
        }

    async def logging_levels(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._levels())

    async def set_logging(self, request: web.Request) -> web.StreamResponse:
        level = requested_level(request)
        if not isinstance(level, LogLevel):
            return level
        py_level = PYTHON_LEVELS[level]
        name = request.query.get("filter")
        filters = self._filters()
        if name is not None:
            filters = [f for f in filters if f.name == name]
            if not filters:
                return web.json_response({"error": f"no filter named {name!r}"}, status=404)
        else:
            logging.getLogger("sluice").setLevel(py_level)
        for f in filters:
            f.plugin.set_log_level(level)
            FilterLogs.set_level(f.name, level)
        target = name if name is not None else "sluice and all filters"
        log.info("log level set to %s for %s", level.name.lower(), target)
        return web.json_response(self._levels())

    async def drain(self, request: web.Request) -> web.StreamResponse:
        already = self.gateway.draining
        if not already:
            log.info("drain requested through the admin API")
        self.gateway.drain()
        return web.json_response({"draining": True, "already": already}, status=202)

    # -- dashboard -------------------------------------------------------------------------------
    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        if self._dashboard is None:
            self._dashboard = importlib.resources.files("sluice.proxy").joinpath("dashboard.html").read_bytes()
        return web.Response(
            body=self._dashboard,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": (
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                    "connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
                ),
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
            },
        )

    def request_rate(self) -> float:
        """Requests per second over the last ~10 s (since the first sample when younger)."""
        now, total = time.monotonic(), self.gateway.stats.requests_total
        samples = self._rate_samples
        while len(samples) > 1 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()
        then, before = samples[0]
        if now - samples[-1][0] >= 0.5:
            samples.append((now, total))
        elapsed = now - then
        return max(total - before, 0) / elapsed if elapsed > 0 else 0.0

    def dashboard_data(self) -> dict[str, Any]:
        gw = self.gateway
        gen = gw.current_generation()
        stats = gw.stats
        filters = []
        for f in self._filters():
            info = self._filter_info(f)
            seconds = f.report().callback_seconds
            info["latency"] = {
                "mean_us": round(seconds.sum / seconds.count * 1e6, 2) if seconds.count else None,
                "p99_le_us": _p99_le_us(seconds),
            }
            filters.append(info)
        history = gw.reload_history()
        events = list(history.events)[-20:] if history is not None else []
        return {
            "time": time.time(),
            "uptime_s": round(time.time() - self.started, 1),
            "generation": gen.number if gen is not None else None,
            "draining": gw.draining,
            "ready": gen is not None and gw.address is not None and not gw.draining,
            "listen": f"{gw.address[0]}:{gw.address[1]}" if gw.address else None,
            "requests_total": stats.requests_total,
            "request_rate": round(self.request_rate(), 2),
            "requests_active": stats.requests_active,
            "responses": dict(stats.responses),
            "local_replies": dict(stats.local_replies),
            "routes": [
                {"route": r, "cluster": c, "status_class": s, "requests": n}
                for (r, c, s), n in sorted(stats.traffic.requests.items())
            ],
            "filters": filters,
            "clusters": self._clusters(),
            "reloads": {
                "enabled": history is not None,
                "events": [_event_json(e) for e in reversed(events)],
            },
        }

    async def dashboard_json(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.dashboard_data())


def _event_json(event: ReloadEvent) -> dict[str, Any]:
    data = dataclasses.asdict(event)
    data["trigger"] = event.trigger.value
    data["time_iso"] = _iso(event.time)
    return data


# -- shared by this admin and the fleet's (fleet_admin.py) -------------------------------------------


def admin_guard(token: Callable[[], str | None]) -> Middleware:
    """The admin API's access control as an aiohttp middleware: with a token (`token()`), every
    request needs ``Authorization: Bearer <token>``; without one, the `Host` must be local.
    Cross-site writes are refused either way (module docstring)."""

    @web.middleware
    async def guard(request: web.Request, handler: _Handler) -> web.StreamResponse:
        expected = token()
        if expected is not None:
            if not _authorized(request.headers.get("Authorization", ""), expected):
                return web.json_response(
                    {"error": "unauthorized: send Authorization: Bearer <admin.token>"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="sluice-admin"', "Cache-Control": "no-store"},
                )
        elif not _host_is_local(request.host):
            return web.json_response({"error": "Host must be localhost or an IP address"}, status=421)
        if request.method not in ("GET", "HEAD", "OPTIONS") and _cross_site(request):
            return web.json_response({"error": "cross-site request refused"}, status=403)
        response = await handler(request)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    return guard


def requested_level(request: web.Request) -> LogLevel | web.StreamResponse:
    """The `?level=` of a POST /logging, or the 400 that explains what is wrong with it."""
    text = request.query.get("level")
    if not text:
        return web.json_response({"error": "level is required, e.g. /logging?level=debug"}, status=400)
    try:
        return LogLevel.parse(text)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)


def _authorized(header: str, token: str) -> bool:
    scheme, _, credential = header.strip().partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    # compare_digest on bytes of any length: time depends on the length, not the content.
    same = hmac.compare_digest(credential.strip().encode(), token.encode())
    return ok_scheme and same


def _cross_site(request: web.Request) -> bool:
    if request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return True
    return netloc.lower() != request.host.lower()


async def listen_app(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve `app` on host:port (0 = any free port); the runner and the bound address."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    server = site._server  # noqa: SLF001 - the bound port is only known here
    sockets = getattr(server, "sockets", None)
    assert sockets
    sock = sockets[0].getsockname()
    return runner, (str(sock[0]), int(sock[1]))
