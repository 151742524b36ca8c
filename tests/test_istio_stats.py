"""Property `node` and Istio-style stats through the live proxy.

tests/fixtures/zig/node_stats.wasm (built from node_stats.zig by sluice/filters/build.py) reads
`node` -> `metadata` in its configure and fails without it, as Istio's stats plugin does, reads
`listener_direction`, and records `istio_requests_total` and
`istio_request_duration_milliseconds` with Istio's tag encoding; `/stats` shows them as
Prometheus families with labels.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from hosting import LiveProxy, live_proxy
from prometheus_client.parser import text_string_to_metric_families

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "zig" / "node_stats.wasm"
MODULES = {"node_stats.wasm": FIXTURE.read_bytes()}

NODE = """\
node:
  id: sidecar~10.1.2.3~reviews-v1-7d8f.default~default.svc.cluster.local
  cluster: reviews.default
  metadata:
    WORKLOAD_NAME: reviews-v1
    NAMESPACE: default
    ISTIO_VERSION: 1.20.0
    CLUSTER_ID: Kubernetes
    LABELS: {app: reviews, version: v1}
    PROXY_CONFIG: {concurrency: 2, tracing: {sampling: 1.5}}
"""

CONFIG = """\
listen: 127.0.0.1:0
admin: {{listen: "127.0.0.1:0"}}
access_log: null
filters_dir: filters
cache_dir: cache
{node}
traffic_direction: {direction}
clusters:
  reviews: {{endpoints: ["127.0.0.1:{port}"]}}
chain:
  - {{name: stats, module: node_stats.wasm}}
routes:
  - {{name: reviews-route, match: {{prefix: /}}, cluster: reviews}}
"""


def config(node: str, direction: str) -> Callable[[int], str]:
    return lambda port: CONFIG.format(node=node, direction=direction, port=port)


async def traffic_and_stats(live: LiveProxy) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with aiohttp.ClientSession() as s:
        for path in ("/", "/reviews/1", "/missing"):
            async with s.get(live.url(path)) as r:
                await r.read()
        async with s.get(live.admin_url("/stats")) as r:
            assert r.status == 200
            text = await r.text()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    assert types["istio_requests"] == "counter"
    assert types["istio_request_duration_milliseconds"] == "histogram"
    assert types["istio_build"] == "gauge"
    return samples


def labels(code: str, **extra: str) -> dict[str, str]:
    return {
        "filter": "stats", "reporter": "destination", "source_workload": "unknown",
        "source_workload_namespace": "unknown", "destination_workload": "reviews-v1",
        "destination_workload_namespace": "default", "destination_app": "reviews",
        "destination_version": "v1", "destination_service": "reviews", "route_name": "reviews-route",
        "request_protocol": "http", "response_code": code, "response_flags": "-",
        "connection_security_policy": "none", **extra,
    }


def test_istio_style_stats_with_node_metadata(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sluice.filter.stats")

    async def main() -> None:
        async with live_proxy(tmp_path, config(NODE, "inbound"), MODULES) as live:
            samples = await traffic_and_stats(live)
        ok = frozenset(labels("200").items())
        missing = frozenset(labels("404").items())
        assert samples[("istio_requests_total", ok)] == 2
        assert samples[("istio_requests_total", missing)] == 1
        assert samples[("istio_request_duration_milliseconds_count", ok)] == 2
        assert samples[("istio_request_duration_milliseconds_bucket", ok | {("le", "+Inf")})] == 2
        assert samples[("istio_request_duration_milliseconds_count", missing)] == 1
        build = frozenset({"filter": "stats", "component": "proxy", "tag": "1.20.0"}.items())
        assert samples[("istio_build", build)] == 1
        lines = [r.getMessage() for r in caplog.records if "node_stats:" in r.getMessage()]
        assert lines == [
            "[stats] node_stats: node sidecar~10.1.2.3~reviews-v1-7d8f.default~default.svc.cluster.local, "
            "metadata with 6 fields, listener_direction 1, reporter destination"
        ]

    asyncio.run(main())


def test_without_a_node_section_metadata_is_an_empty_struct(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sluice.filter.stats")

    async def main() -> None:
        async with live_proxy(tmp_path, config("", "outbound"), MODULES) as live:
            samples = await traffic_and_stats(live)
        outbound = labels("200", reporter="source", destination_workload="unknown",
                          destination_workload_namespace="unknown", destination_app="unknown",
                          destination_version="unknown")
        assert samples[("istio_requests_total", frozenset(outbound.items()))] == 2
        lines = [r.getMessage() for r in caplog.records if "node_stats:" in r.getMessage()]
        assert lines == ["[stats] node_stats: node -, metadata with 0 fields, listener_direction 2, reporter source"]

    asyncio.run(main())
