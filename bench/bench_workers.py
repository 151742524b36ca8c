#!/usr/bin/env python3
"""Throughput of sluice with 1 and 2 worker processes on this machine.

    python bench/bench_workers.py [--duration 5] [--rounds 3] [--connections 64]

Upstream: nginx `return 200` (one worker, as in bench/bench_proxy.py); load generator: wrk
(one thread). Nothing is pinned: with 2 workers the proxy needs both cores, so on a 2-core machine
wrk and nginx compete with it for the same cores, and the report says how much CPU each took
(from /proc, over the measured run) so the figures can be read for what they are. Rows:

  w1            workers: 1, no filters, access log off
  w2            workers: 2, the same
  w1+ratelimit  workers: 1 + the built-in ratelimit filter (in-process shared data)
  w2+ratelimit  workers: 2 + the built-in ratelimit filter (host-wide LMDB shared data)

The limit is far above the load (every request takes the CAS path, none is denied). Rounds are
interleaved; medians are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_proxy import (  # noqa: E402 - the helpers of the proxy benchmark
    FILTERS,
    cpu_seconds,
    free_port,
    run_wrk,
    started,
    upstream_config,
    wait_http,
)

PY = sys.executable
ROWS = ("w1", "w2", "w1+ratelimit", "w2+ratelimit")


def config(tmp: Path, name: str, port: int, upstream: int) -> Path:
    work = tmp / name
    work.mkdir()
    workers = 2 if name.startswith("w2") else 1
    chain = ""
    if name.endswith("+ratelimit"):
        chain = f"""filters_dir: {FILTERS}
chain:
  - name: ratelimit
    module: ratelimit.wasm
    config: {{requests_per_second: 1000000, burst: 1000000, key: source}}
"""
    path = work / "sluice.yaml"
    path.write_text(
        f"""
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{free_port()}"}}
workers: {workers}
access_log: null
cache_dir: {tmp / "cache"}
shared_data: {{path: {work / "shared"}}}
clusters:
  up: {{endpoints: ["127.0.0.1:{upstream}"], max_connections: 1024}}
routes:
  - match: {{prefix: /}}
    cluster: up
{chain}
"""
    )
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="seconds (whole: wrk takes no fractions)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install -y wrk nginx)", file=sys.stderr)
            return 2
    results: dict[str, list[dict[str, float]]] = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-workers-") as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        up_port = free_port()
        nginx = stack.enter_context(started(["nginx", "-c", str(upstream_config(tmp, up_port))], tmp / "nginx.log"))
        wait_http(f"http://127.0.0.1:{up_port}/", proc=nginx)
        for _ in range(args.rounds):
            for row in ROWS:
                port = free_port()
                work = tmp / f"{row}-{len(results[row])}"
                work.mkdir()
                conf = config(work, row, port, up_port)
                with started([PY, "-m", "sluice.proxy", "run", "-c", str(conf)], work / "sluice.log") as proc:
                    wait_http(f"http://127.0.0.1:{port}/", proc=proc)
                    url = f"http://127.0.0.1:{port}/"
                    run_wrk(url, args.warmup, args.connections, None)
                    before = (cpu_seconds(proc.pid), cpu_seconds(nginx.pid))
                    run = run_wrk(url, args.duration, args.connections, None)
                    after = (cpu_seconds(proc.pid), cpu_seconds(nginx.pid))
                    run["sluice_cores"] = (after[0] - before[0]) / args.duration
                    run["nginx_cores"] = (after[1] - before[1]) / args.duration
                    results[row].append(run)
    print(f"{'row':14} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'non2xx':>7} {'sluice cores':>13} {'nginx cores':>12}")
    for row, runs in results.items():
        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        print(f"{row:14} {med('rps'):9.0f} {med('p50_ms'):7.2f} {med('p99_ms'):7.2f} {med('non2xx'):7.0f} "
              f"{med('sluice_cores'):13.2f} {med('nginx_cores'):12.2f}")
    print("wrk takes the rest of the 2 cores (not measured); other work on the machine competes too.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
