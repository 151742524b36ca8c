"""`workers: N` through real processes and sockets: a supervisor, worker processes sharing the
listen port with SO_REUSEPORT, host-wide shared data on LMDB, restarts, fleet reload and drain.

Each test runs `python -m sluice.proxy run` in a subprocess (tests/fleet.py) in front of an aiohttp
upstream in the test process, and talks to it over loopback. Limits on time are generous bounds
for a loaded 2-core machine, except where the issue sets one (a restart within 2 s).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import run, upstream
from fleet import FILTERS, Client, Fleet, owner_pid

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT workers: Linux")


def fleet_config(up: str, chain: str, *, filters_dir: Path = FILTERS, workers: int = 2) -> str:
    return f"""
        listen: 127.0.0.1:0
        admin: {{listen: "@ADMIN@"}}
        workers: {workers}
        filters_dir: {filters_dir}
        cache_dir: cache
        access_log: null
        drain_timeout: 10
        clusters:
          up: {{endpoints: ["{up}"]}}
        chain:
{chain}
        routes:
          - match: {{prefix: /}}
            cluster: up
        """


RATELIMIT = """
          - name: ratelimit
            module: ratelimit.wasm
            config: {requests_per_second: 0.001, burst: 50, key: "header:x-key"}
"""


def test_burst_on_one_key_is_exact_across_two_workers(tmp_path: Path) -> None:
    async def body() -> None:
        async with upstream() as up:
            fleet = Fleet(tmp_path, fleet_config(up, RATELIMIT))
            try:
                await fleet.start()
                pids = await fleet.worker_pids()
                clients = [await Client.connect(fleet.port) for _ in range(100)]
                owners = {owner_pid(fleet.port, c.local_port, pids) for c in clients}
                assert owners == set(pids), "both workers must have connections for this test to mean anything"

                async def three(c: Client) -> list[int]:
                    return [(await c.get("/", {"x-key": "burst"}))[0] for _ in range(3)]

                statuses = [s for r in await asyncio.gather(*(three(c) for c in clients)) for s in r]
                counts = collections.Counter(statuses)
                assert counts == {200: 50, 429: 250}, counts
                for c in clients:
                    c.close()
                stats = await fleet.get_json("/filters")
                assert set(stats["ratelimit"]["workers"]) == {"0", "1"}
            finally:
                status = fleet.stop()
                fleet.kill_all()
            assert status == 0, fleet.log()

    run(body(), timeout=120)
