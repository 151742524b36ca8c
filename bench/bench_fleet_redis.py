#!/usr/bin/env python3
"""The fleet-wide rate limit: three sluice instances (two workers each) and one Redis.

    python bench/bench_fleet_redis.py [--rate 100] [--burst 10] [--seconds 30] [--connections 16]

Every instance is a real `sluice run` (supervisor + 2 workers, its own cache and LMDB directory:
three "hosts") in front of nginx `return 200`, with the built-in ratelimit filter on one key,
`backend: redis`, `on_backend_failure: local`. The load generator (aiohttp, in this process)
keeps `--connections` connections busy on each instance, all with the same key, so the demand is
far above the limit.

Phase 1 (`--seconds`): admitted requests against the ideal rate x seconds + burst, and 5xx.
Phase 2 (20 s): Redis is stopped at 5 s and started again at 10 s (same port, empty). Reports
5xx (must be 0), the WARN lines, the fallback decisions, and how long after Redis returned the
instances stopped falling back (the fleet-wide limit holds again), from their `/stats`.
Other work on the machine runs at the same time: the figures are for this 2-core box. The
filter's CPU deadline is raised to 200 ms: it is wall-clock time, and with everything here on two
cores a worker can be descheduled for longer than the default 20 ms in the middle of a callback
(that is a 503 the deadline causes, not Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_proxy import free_port, started, upstream_config, wait_http  # noqa: E402
from fleet import FILTERS, Fleet  # noqa: E402
from redis_server import RedisServer  # noqa: E402


def fleet_config(up_port: int, redis: str, rate: float, burst: int) -> str:
    return f"""
        listen: 127.0.0.1:0
        admin: {{listen: "@ADMIN@"}}
        workers: 2
        filters_dir: {FILTERS}
        cache_dir: cache
        access_log: null
        clusters:
          up: {{endpoints: ["127.0.0.1:{up_port}"], max_connections: 1024}}
          limits: {{type: redis, endpoints: ["{redis}"], timeout: 0.2, connect_timeout: 0.5}}
        chain:
          - name: ratelimit
            module: ratelimit.wasm
            cpu_deadline_ms: 200  # wall clock: 6 workers, Redis, nginx and the load share 2 cores
            config:
              requests_per_second: {rate}
              burst: {burst}
              key: "header:x-key"
              backend: redis
              redis: {{cluster: limits, timeout_ms: 100, retry_interval_ms: 250}}
              on_backend_failure: local
        routes:
          - match: {{prefix: /}}
            cluster: up
        """


async def fallbacks(fleets: list[Fleet]) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    async with aiohttp.ClientSession() as session:
        for fleet in fleets:
            async with session.get(f"{fleet.admin}/stats") as r:
                text = await r.text()
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    name = s.labels.get("name")
                    if s.name == "sluice_filter_counter_total" and name == "ratelimit_fallback_decisions":
                        total += s.value
    return total


FIVE_XX: list[str] = []


async def load(fleets: list[Fleet], seconds: float, connections: int) -> list[collections.Counter[int]]:
    """Per-second status counts over `seconds`, all requests on one key."""
    started_at = time.monotonic()
    buckets: list[collections.Counter[int]] = [collections.Counter() for _ in range(int(seconds) + 1)]

    async def client(url: str) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            while (elapsed := time.monotonic() - started_at) < seconds:
                try:
                    async with session.get(url, headers={"x-key": "fleet"}) as r:
                        body = await r.read()
                        status = r.status
                        if status >= 500 and len(FIVE_XX) < 5:
                            FIVE_XX.append(f"{status} {body[:80]!r}")
                except aiohttp.ClientError:
                    status = 0
                buckets[int(elapsed)][status] += 1

    await asyncio.gather(*(client(f.url) for f in fleets for _ in range(connections)))
    return buckets


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="sluice-bench-fleet-") as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        up_port = free_port()
        nginx = stack.enter_context(started(["nginx", "-c", str(upstream_config(tmp, up_port))], tmp / "nginx.log"))
        wait_http(f"http://127.0.0.1:{up_port}/", proc=nginx)
        redis = RedisServer(tmp / "redis").start()
        stack.callback(redis.stop)
        fleets = []
        for i in range(3):
            directory = tmp / f"host{i}"
            directory.mkdir()
            fleet = Fleet(directory, fleet_config(up_port, redis.address, args.rate, args.burst))
            stack.callback(fleet.kill_all)
            stack.callback(fleet.stop)
            await fleet.start()
            fleets.append(fleet)
        print(f"3 instances x 2 workers + redis-server {redis.address}; limit {args.rate:g}/s, burst {args.burst}")

        fallback_start = await fallbacks(fleets)
        buckets = await load(fleets, args.seconds, args.connections)
        fallback_phase1 = await fallbacks(fleets) - fallback_start
        total = sum(buckets, collections.Counter())
        admitted = total[200]
        ideal = args.rate * args.seconds + args.burst
        print(f"phase 1: {sum(total.values())} requests in {args.seconds:g}s, admitted {admitted} "
              f"(ideal {ideal:.0f}: {(admitted - ideal) / ideal * 100:+.2f}%), 429 {total[429]}, "
              f"5xx {sum(v for k, v in total.items() if k >= 500)}, failed {total[0]}, "
              f"fallback decisions {fallback_phase1:.0f}")
        print(f"phase 1: statuses {dict(total)}; admitted per second {[b[200] for b in buckets]}")

        before = await fallbacks(fleets)
        task = asyncio.ensure_future(load(fleets, 20, args.connections))
        await asyncio.sleep(5)
        redis.stop()
        await asyncio.sleep(5)
        redis.start()
        back = time.monotonic()
        last_change, seen = back, await fallbacks(fleets)
        while time.monotonic() - back < 5:
            await asyncio.sleep(0.1)
            now = await fallbacks(fleets)
            if now != seen:
                seen, last_change = now, time.monotonic()
        buckets = await task
        total = sum(buckets, collections.Counter())
        warns = sum(f.log().count("falling back") for f in fleets)
        if FIVE_XX:
            print(f"5xx answers: {FIVE_XX}")
            for f in fleets:
                for line in f.log().splitlines():
                    if "ERROR" in line or "Traceback" in line:
                        print("  ", line[:200])
        print(f"phase 2: admitted per second {[b[200] for b in buckets[:20]]}")
        print(f"phase 2: 5xx {sum(v for k, v in total.items() if k >= 500)}, failed {total[0]}, "
              f"fallback decisions {seen - before:.0f}, WARN lines {warns} (one per worker that saw Redis fail), "
              f"fleet-wide limit again {max(last_change - back, 0.0):.2f}s after Redis returned")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--burst", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--connections", type=int, default=16, help="per instance")
    args = parser.parse_args()
    for tool in ("nginx", "redis-server"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install -y nginx redis-server)", file=sys.stderr)
            return 2
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
