"""The admin endpoint over real HTTP: an in-process proxy (port 0) with the built-in filters in front
of a real upstream, and its admin listener on another port 0."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import wasmtime
from conftest import ROOT, proxy, run, upstream
from prometheus_client.parser import text_string_to_metric_families

from sluice import BUILTIN_FILTERS_DIR
from sluice.abi import LogLevel
from sluice.proxy.admin import REDACTED, AdminServer, is_secret_key, redact
from sluice.proxy.reloadevents import ReloadCounter, ReloadEvent, ReloadHistory, ReloadTrigger

FILTERS = BUILTIN_FILTERS_DIR
WAT = ROOT / "tests" / "fixtures" / "wat"

API_KEY = "s3cret-key-1"
JWT_SECRET = "jwt-signing-secret-xyz"
ADMIN_TOKEN = "admin-token-abc123"


def need_filters() -> None:
    for name in ("auth.wasm", "ratelimit.wasm", "ab.wasm"):
        if not (FILTERS / name).exists():
            pytest.skip(f"{FILTERS / name} not built")


def builtin_config(up: str, *, token: str | None = None, extra_clusters: str = "", extra_routes: str = "") -> str:
    admin = f'admin: {{listen: "127.0.0.1:0", token: "{token}"}}' if token else 'admin: {listen: "127.0.0.1:0"}'
    return f"""
    listen: 127.0.0.1:0
    {admin}
    access_log: null
    filters_dir: {FILTERS}
    clusters:
      web: {{endpoints: ["{up}"]}}
{extra_clusters}
    chain:
      - name: auth
        module: auth.wasm
        config:
          api_keys: ["{API_KEY}", {{key: "other-key-2", subject: "bob"}}]
          jwt: {{secret: "{JWT_SECRET}"}}
          exempt_paths: ["/public"]
      - name: ratelimit
        module: ratelimit.wasm
        config: {{requests_per_second: 1000, burst: 1000, key: subject}}
      - name: ab
        module: ab.wasm
        config: {{variants: {{stable: 100, canary: 0}}, header: x-variant, allow_force: [canary]}}
    routes:
{extra_routes}
      - name: canary
        match: {{prefix: /, headers: {{x-variant: canary}}}}
        cluster: web
      - name: default
        match: {{prefix: /}}
        cluster: web
    """


@contextlib.asynccontextmanager
async def admin_proxy(cfg: str, base_dir: Path | None = None) -> AsyncIterator[tuple[Any, AdminServer]]:
    """A started Gateway and its AdminServer, both on 127.0.0.1 port 0."""
    async with proxy(cfg, base_dir) as gw:
        admin = AdminServer(gw)
        await admin.start("127.0.0.1", 0)
        try:
            yield gw, admin
        finally:
            await admin.stop()


def proxy_url(gw: Any, path: str) -> str:
    return f"http://127.0.0.1:{gw.port}{path}"


def admin_url(admin: AdminServer, path: str) -> str:
    return f"http://127.0.0.1:{admin.port}{path}"


async def send(s: aiohttp.ClientSession, gw: Any, path: str, key: str | None = API_KEY, **headers: str) -> int:
    hdrs = dict(headers)
    if key is not None:
        hdrs["x-api-key"] = key
    async with s.get(proxy_url(gw, path), headers=hdrs) as r:
        await r.read()
        return r.status


async def known_traffic(s: aiohttp.ClientSession, gw: Any) -> None:
    """3 allowed requests (one forced to the canary route), 2 without a key (401)."""
    assert await send(s, gw, "/a") == 200
    assert await send(s, gw, "/b") == 200
    assert await send(s, gw, "/c", **{"x-variant": "canary"}) == 200
    assert await send(s, gw, "/d", key=None) == 401
    assert await send(s, gw, "/e", key=None) == 401


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(s: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, /, **labels: str) -> float:
    key = (metric, frozenset(labels.items()))
    assert key in s, f"no sample {metric}{labels}; have {sorted(k for k in s if k[0] == metric)}"
    return s[key]


# -- health, readiness, drain ------------------------------------------------------------------------


def test_healthz_ready_and_drain() -> None:
    need_filters()

    async def main() -> None:
        async with upstream() as up, admin_proxy(builtin_config(up)) as (gw, admin):
            drained = asyncio.Event()
            gw.on_drain = drained.set  # what `sluice run` does: the SIGTERM path
            async with aiohttp.ClientSession() as s:
                async with s.get(admin_url(admin, "/healthz")) as r:
                    assert r.status == 200
                async with s.get(admin_url(admin, "/ready")) as r:
                    assert r.status == 200
                    body = await r.json()
                assert body["ready"] is True
                assert body["filters"] == {"auth": "ok", "ratelimit": "ok", "ab": "ok"}
                async with s.post(admin_url(admin, "/drain")) as r:
                    assert r.status == 202
                assert drained.is_set()
                async with s.get(admin_url(admin, "/ready")) as r:
                    assert r.status == 503
                    assert (await r.json())["reason"] == "draining"
                async with s.get(admin_url(admin, "/healthz")) as r:
                    assert r.status == 200

    run(main())


def test_ready_is_503_before_start() -> None:
    async def main() -> None:
        from conftest import make_config

        from sluice.proxy.app import Gateway

        gw = Gateway(make_config('listen: 127.0.0.1:0\nadmin: {listen: "127.0.0.1:0"}\n'))
        admin = AdminServer(gw)
        await admin.start("127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as s, s.get(admin_url(admin, "/ready")) as r:
                assert r.status == 503
                assert (await r.json())["reason"] == "starting"
        finally:
            await admin.stop()

    run(main())


# -- /stats ------------------------------------------------------------------------------------------


def test_stats_after_known_traffic() -> None:
    need_filters()

    async def main() -> None:
        async with upstream() as up, admin_proxy(builtin_config(up)) as (gw, admin), aiohttp.ClientSession() as s:
            await known_traffic(s, gw)
            async with s.get(admin_url(admin, "/stats")) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
        m = samples(text)
        # Requests by route, cluster and status class.
        assert value(m, "sluice_requests_total", route="default", cluster="web", status_class="2xx") == 2
        assert value(m, "sluice_requests_total", route="canary", cluster="web", status_class="2xx") == 1
        assert value(m, "sluice_requests_total", route="none", cluster="none", status_class="4xx") == 2
        assert value(m, "sluice_downstream_requests_total") == 5
        assert value(m, "sluice_responses_total", status_class="2xx") == 3
        assert value(m, "sluice_responses_total", status_class="4xx") == 2
        # Upstream latency per cluster: one sample per proxied request.
        assert value(m, "sluice_upstream_latency_seconds_count", cluster="web") == 3
        assert value(m, "sluice_upstream_latency_seconds_bucket", cluster="web", le="+Inf") == 3
        assert value(m, "sluice_upstream_latency_seconds_sum", cluster="web") > 0
        # Per-filter callback time histograms and counters.
        for name in ("auth", "ratelimit", "ab"):
            assert value(m, "sluice_filter_callback_seconds_count", filter=name) > 0
            assert value(m, "sluice_filter_traps_total", filter=name) == 0
            assert value(m, "sluice_filter_deadlines_total", filter=name) == 0
            assert value(m, "sluice_filter_failure_policy_total", filter=name, action="fail_closed") == 0
            assert value(m, "sluice_filter_vms", filter=name) == 1
            assert value(m, "sluice_filter_memory_bytes", filter=name) > 0
            assert value(m, "sluice_filter_up", filter=name) == 1
        assert value(m, "sluice_filter_streams_total", filter="auth") == 5
        # Metrics the filters define through the ABI: one family each, labelled by filter.
        assert value(m, "auth_allowed_total", filter="auth") == 3
        assert value(m, "auth_denied_total", filter="auth") == 2
        assert value(m, "ratelimit_allowed_total", filter="ratelimit") == 3
        assert value(m, "ab_variant_stable_total", filter="ab") == 2
        assert not any(k[0].startswith(("sluice_filter_counter", "sluice_filter_gauge")) for k in m)
        # Reloads: none happened (and no reloader in this process).
        assert value(m, "sluice_reloads_total", result="ok") == 0
        assert value(m, "sluice_reloads_total", result="failed") == 0
        sha = hashlib.sha256((FILTERS / "auth.wasm").read_bytes()).hexdigest()
        info = [k for k in m if k[0] == "sluice_filter_info" and ("filter", "auth") in k[1]]
        assert len(info) == 1 and ("sha256", sha) in info[0][1] and ("generation", "1") in info[0][1]
        assert value(m, "sluice_cluster_endpoint_healthy", cluster="web", endpoint=up) == 1

    run(main())


def failure_wasm(tmp_path: Path) -> Path:
    out = tmp_path / "filters" / "failure.wasm"
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(wasmtime.wat2wasm((WAT / "failure.wat").read_text()))
    return out


def test_traps_and_failure_policy_counters(tmp_path: Path) -> None:
    failure_wasm(tmp_path)

    async def main() -> None:
        async with upstream() as up:
            cfg = f"""
            listen: 127.0.0.1:0
            admin: {{listen: "127.0.0.1:0"}}
            access_log: null
            filters_dir: {tmp_path / "filters"}
            clusters:
              web: {{endpoints: ["{up}"]}}
            chain:
              - {{name: closed, module: failure.wasm, config: request_headers}}
              - {{name: open, module: failure.wasm, config: response_headers, failure_policy: fail_open}}
            routes:
              - {{match: {{prefix: /}}, cluster: web}}
            """
            async with admin_proxy(cfg) as (gw, admin), aiohttp.ClientSession() as s:
                async with s.get(proxy_url(gw, "/fine")) as r:
                    assert r.status == 200
                async with s.get(proxy_url(gw, "/trap")) as r:
                    assert r.status == 503  # "closed" trapped: fail_closed
                async with s.get(admin_url(admin, "/stats")) as r:
                    m = samples(await r.text())
                async with s.get(admin_url(admin, "/filters")) as r:
                    filters = await r.json()
        assert value(m, "sluice_filter_traps_total", filter="closed") == 1
        assert value(m, "sluice_filter_failure_policy_total", filter="closed", action="fail_closed") == 1
        assert value(m, "sluice_filter_traps_total", filter="open") == 0
        assert value(m, "sluice_requests_total", route="none", cluster="none", status_class="5xx") == 1
        assert filters["closed"]["counters"]["traps"] == 1
        assert "trapped in proxy_on_request_headers" in filters["closed"]["last_error"]
        assert filters["open"]["last_error"] is None

    run(main())


# -- /filters, /clusters, /config ---------------------------------------------------------------------


def test_filters_endpoint() -> None:
    need_filters()

    async def main() -> None:
        async with upstream() as up, admin_proxy(builtin_config(up)) as (gw, admin), aiohttp.ClientSession() as s:
            await known_traffic(s, gw)
            async with s.get(admin_url(admin, "/filters")) as r:
                assert r.status == 200
                body = await r.json()
        assert list(body) == ["auth", "ratelimit", "ab"]
        auth = body["auth"]
        assert auth["module"] == str(FILTERS / "auth.wasm")
        assert auth["sha256"] == hashlib.sha256((FILTERS / "auth.wasm").read_bytes()).hexdigest()
        assert auth["abi_version"] == "0.2.1"
        assert auth["generation"] == 1
        assert auth["loaded_at"].endswith("Z")
        assert auth["state"] == "ok"
        assert auth["last_error"] is None
        assert auth["counters"]["streams"] == 5
        assert auth["counters"]["callbacks"] > 0
        assert auth["counters"]["traps"] == 0
        assert auth["metrics"] == {"auth_allowed": 3, "auth_denied": 2}
        assert body["ratelimit"]["metrics"]["ratelimit_allowed"] == 3

    run(main())


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_clusters_report_endpoint_health() -> None:
    need_filters()
    dead = f"127.0.0.1:{_closed_port()}"

    async def main() -> None:
        cfg = builtin_config(
            "PLACEHOLDER",
            extra_clusters=f'      dead: {{endpoints: ["{dead}"], connect_timeout: 2}}',
            extra_routes="      - {name: dead, match: {prefix: /dead}, cluster: dead}",
        )
        async with (
            upstream() as up,
            admin_proxy(cfg.replace("PLACEHOLDER", up)) as (gw, admin),
            aiohttp.ClientSession() as s,
        ):
            assert await send(s, gw, "/ok") == 200
            assert await send(s, gw, "/dead") == 502
            async with s.get(admin_url(admin, "/clusters")) as r:
                assert r.status == 200
                body = await r.json()
        assert body["web"]["endpoints"] == [
            {"address": up, "healthy": True, "failures": 0, "down_for_s": 0.0, "idle_connections": 1}
        ]
        assert body["web"]["connects"] == 1
        ep = body["dead"]["endpoints"][0]
        assert ep["address"] == dead and ep["healthy"] is False and ep["failures"] == 1 and ep["down_for_s"] > 0
        assert body["dead"]["connect_failures"] == 1

    run(main())


def test_config_is_redacted() -> None:
    need_filters()

    async def main() -> None:
        async with upstream() as up:
            cfg = builtin_config(up, token=ADMIN_TOKEN)
            async with admin_proxy(cfg) as (_gw, admin), aiohttp.ClientSession() as s:
                headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                async with s.get(admin_url(admin, "/config"), headers=headers) as r:
                    assert r.status == 200
                    text = await r.text()
                    body = await r.json()
        for secret in (API_KEY, "other-key-2", JWT_SECRET, ADMIN_TOKEN):
            assert secret not in text
        config = body["config"]
        auth = config["chain"][0]["config"]
        assert auth["api_keys"] == REDACTED
        assert auth["jwt"] == {"secret": REDACTED}
        assert auth["exempt_paths"] == ["/public"]  # not a secret: shown
        assert config["admin"]["token"] == REDACTED
        assert config["chain"][1]["config"]["requests_per_second"] == 1000
        assert config["clusters"]["web"]["endpoints"] == [up]

    run(main())


def test_redaction_rules() -> None:
    data = {
        "a": {"deep": [{"password": "p", "Client_Secret": "c", "name": "n", "apiKey": "k"}]},
        "token": None,
        "keys": [],
        "variants": {"stable": 1},
        "environment": {"DB_PASSWORD": "x", "MODE": "prod"},
    }
    assert redact(data) == {
        "a": {"deep": [{"password": REDACTED, "Client_Secret": REDACTED, "name": "n", "apiKey": REDACTED}]},
        "token": None,
        "keys": [],
        "variants": {"stable": 1},
        "environment": {"DB_PASSWORD": REDACTED, "MODE": "prod"},
    }
    assert not is_secret_key("monkey") and is_secret_key("key") and is_secret_key("jwt_secret")


# -- access control -----------------------------------------------------------------------------------


def test_token_is_required_on_every_endpoint() -> None:
    need_filters()

    async def main() -> None:
        async with upstream() as up, admin_proxy(builtin_config(up, token=ADMIN_TOKEN)) as (_gw, admin):
            good = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with aiohttp.ClientSession() as s:
                for method, path in (
                    ("GET", "/"), ("GET", "/stats"), ("GET", "/ready"), ("GET", "/healthz"), ("GET", "/filters"),
                    ("GET", "/config"), ("GET", "/dashboard.json"), ("POST", "/reload"), ("POST", "/drain"),
                    ("POST", "/logging?level=info"),
                ):
                    for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN},
                                {"Authorization": f"Basic {ADMIN_TOKEN}"},
                                {"Authorization": f"Bearer {ADMIN_TOKEN}x"}):
                        async with s.request(method, admin_url(admin, path), headers=bad) as r:
                            assert r.status == 401, (method, path, bad)
                            assert r.headers["WWW-Authenticate"].startswith("Bearer")
                for path in ("/", "/stats", "/ready", "/filters", "/config", "/clusters"):
                    async with s.get(admin_url(admin, path), headers=good) as r:
                        assert r.status == 200, path

    run(main())


def test_cross_site_posts_and_rebound_hosts_are_refused() -> None:
    need_filters()

    async def main() -> None:
        async with upstream() as up, admin_proxy(builtin_config(up)) as (gw, admin):
            drained = asyncio.Event()
            gw.on_drain = drained.set
            async with aiohttp.ClientSession() as s:
                async with s.post(admin_url(admin, "/drain"), headers={"Origin": "http://evil.example"}) as r:
                    assert r.status == 403
                async with s.post(admin_url(admin, "/drain"), headers={"Sec-Fetch-Site": "cross-site"}) as r:
                    assert r.status == 403
                async with s.get(admin_url(admin, "/stats"), headers={"Host": "evil.example:9901"}) as r:
                    assert r.status == 421
                async with s.get(admin_url(admin, "/stats"), headers={"Host": f"localhost:{admin.port}"}) as r:
                    assert r.status == 200
                assert not drained.is_set()
                origin = f"http://127.0.0.1:{admin.port}"
                async with s.post(admin_url(admin, "/drain"), headers={"Origin": origin}) as r:
                    assert r.status == 202
                assert drained.is_set()

    run(main())


# -- /reload ------------------------------------------------------------------------------------------


class FakeReloader:
    """A `ReloadSource` whose attempts succeed or fail as told, without touching files."""

    def __init__(self, ok: bool) -> None:
        self.ok = ok
        self.history = ReloadHistory()
        self.triggers: list[str] = []

    async def reload(self, trigger: ReloadTrigger = ReloadTrigger.ADMIN) -> ReloadEvent:
        self.triggers.append(trigger)
        event = ReloadEvent(
            1_700_000_000.0, trigger, self.ok, 2 if self.ok else 1, ["x.wasm"],
            None if self.ok else "x.wasm: not wasm", 12.5,
        )
        self.history.record(event)
        return event

    async def stop(self) -> None:
        return None


def test_reload_endpoint() -> None:
    need_filters()

    async def main() -> None:
        async with upstream() as up, admin_proxy(builtin_config(up)) as (gw, admin), aiohttp.ClientSession() as s:
            async with s.post(admin_url(admin, "/reload")) as r:
                assert r.status == 503
                assert "not enabled" in (await r.json())["error"]
            gw.reloader = FakeReloader(ok=True)
            async with s.post(admin_url(admin, "/reload")) as r:
                assert r.status == 200
                body = await r.json()
            assert body["ok"] is True and body["trigger"] == "admin" and body["generation"] == 2
            assert body["changed"] == ["x.wasm"] and body["duration_ms"] == 12.5
            assert gw.reloader.triggers == ["admin"]
            failing = FakeReloader(ok=False)
            failing.history = gw.reloader.history
            gw.reloader = failing
            async with s.post(admin_url(admin, "/reload")) as r:
                assert r.status == 500
                body = await r.json()
            assert body["ok"] is False and body["error"] == "x.wasm: not wasm"
            async with s.get(admin_url(admin, "/stats")) as r:
                m = samples(await r.text())
            assert value(m, "sluice_reloads_total", result="ok") == 1
            assert value(m, "sluice_reloads_total", result="failed") == 1
            async with s.get(admin_url(admin, "/dashboard.json")) as r:
                dash = await r.json()
            assert [e["ok"] for e in dash["reloads"]["events"]] == [False, True]  # newest first

    run(main())


# -- /logging ------------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Any:
    names = ["sluice", "sluice.filter.auth", "sluice.filter.ratelimit", "sluice.filter.ab"]
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)


def test_logging_levels(restore_logging: Any) -> None:
    need_filters()

    async def main() -> None:
        async with upstream() as up, admin_proxy(builtin_config(up)) as (gw, admin), aiohttp.ClientSession() as s:
            plugins = {f.name: f.plugin for f in gw.generation.filters}
            assert all(p.report().log_level is LogLevel.INFO for p in plugins.values())
            async with s.post(admin_url(admin, "/logging?level=debug&filter=auth")) as r:
                assert r.status == 200
                body = await r.json()
            assert body["filters"] == {"auth": "debug", "ratelimit": "info", "ab": "info"}
            assert plugins["auth"].report().log_level is LogLevel.DEBUG
            assert plugins["ratelimit"].report().log_level is LogLevel.INFO
            assert logging.getLogger("sluice.filter.auth").isEnabledFor(logging.DEBUG)
            async with s.post(admin_url(admin, "/logging?level=warn")) as r:
                assert r.status == 200
                body = await r.json()
            assert body == {"sluice": "warning", "filters": {"auth": "warn", "ratelimit": "warn", "ab": "warn"}}
            assert all(p.report().log_level is LogLevel.WARN for p in plugins.values())
            assert not logging.getLogger("sluice").isEnabledFor(logging.INFO)
            async with s.post(admin_url(admin, "/logging?level=loud")) as r:
                assert r.status == 400
            async with s.post(admin_url(admin, "/logging?level=debug&filter=nope")) as r:
                assert r.status == 404
            async with s.post(admin_url(admin, "/logging")) as r:
                assert r.status == 400
            async with s.get(admin_url(admin, "/logging")) as r:
                assert (await r.json())["filters"]["ab"] == "warn"

    run(main())


def test_reload_with_the_real_reloader(tmp_path: Path) -> None:
    need_filters()
    from sluice.proxy.app import Gateway
    from sluice.proxy.config import load_config
    from sluice.proxy.reload import Reloader

    async def main() -> None:
        async with upstream() as up:
            path = tmp_path / "sluice.yaml"
            path.write_text(builtin_config(up))
            gw = Gateway(load_config(path))
            gw.watch = False  # no file watching: only the admin triggers reloads here
            await gw.start("127.0.0.1", 0)
            gw.reloader = Reloader(gw, path)
            admin = AdminServer(gw)
            await admin.start("127.0.0.1", 0)
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.post(admin_url(admin, "/reload")) as r:
                        assert r.status == 200, await r.text()
                        body = await r.json()
                    assert body["ok"] is True and body["trigger"] == "admin" and body["generation"] == 2
                    path.write_text("listen: [oops\n")
                    async with s.post(admin_url(admin, "/reload")) as r:
                        assert r.status == 500
                        body = await r.json()
                    assert body["ok"] is False and str(path) in body["error"]
                    async with s.get(admin_url(admin, "/stats")) as r:
                        m = samples(await r.text())
                    assert value(m, "sluice_reloads_total", result="ok") == 1
                    assert value(m, "sluice_reloads_total", result="failed") == 1
                    assert value(m, "sluice_generation") == 2
            finally:
                await admin.stop()
                await gw.stop(drain_timeout=5.0)

    run(main())


def test_reload_counter_counts_each_event_once() -> None:
    counter = ReloadCounter()
    counter.count(ReloadEvent(0.0, ReloadTrigger.STARTUP, True, 1, [], None, 0.0))
    assert (counter.ok, counter.failed) == (0, 0)  # the initial load is not a reload
    counter.count(ReloadEvent(1.0, ReloadTrigger.FILE, True, 2, ["a.wasm"], None, 1.0))
    counter.count(ReloadEvent(2.0, ReloadTrigger.ADMIN, False, 2, [], "x: bad", 1.0))
    assert (counter.ok, counter.failed) == (1, 1)
    # More events than the history keeps: every one recorded still counts.
    history = ReloadHistory(maxlen=2)
    history.counts = counter
    for i in range(3):
        history.record(ReloadEvent(3.0 + i, ReloadTrigger.ADMIN, True, 3 + i, [], None, 1.0))
    assert (counter.ok, counter.failed) == (4, 1)
