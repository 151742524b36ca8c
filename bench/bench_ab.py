#!/usr/bin/env python3
"""Two sluice checkouts side by side against the same nginx: is a change faster in wall-clock terms?

    python bench/bench_ab.py BEFORE AFTER [--only sluice,sluice+3] [--rounds 3] [--duration 5]

BEFORE and AFTER are checkouts, each with its own `.venv` (`make test` there makes it, or
`python3 -m venv .venv && .venv/bin/pip install -e '.[dev,build]'`). On a shared machine the
speed of everything drifts from run to run by more than most changes are worth, so comparing
two `bench_proxy.py` runs says little; here both versions run in one session, interleaved
round by round, beside nginx proxy_pass (log on) as the yardstick: the same upstream (nginx
`return 200`), the same pinning (the proxies on one core, nginx upstream and wrk on the other),
the same config per target (`bench_proxy.sluice_config`). Medians of the rounds, with user and
system CPU per request. For changes smaller than the drift, count instructions
(`count_instructions.py`) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_proxy as bp  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--only", default="sluice,sluice+3", help="comma-separated bench_proxy.py sluice targets")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    for label, root in checkouts.items():
        if not (root / ".venv" / "bin" / "python").exists():
            print(f"{label}: {root} has no .venv (make one there first)", file=sys.stderr)
            return 2
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in bp.TARGETS or not n.startswith("sluice")]
    if unknown:
        print(f"not sluice targets of bench_proxy.py: {', '.join(unknown)}", file=sys.stderr)
        return 2
    proxy_core, other_cores = bp.cores()
    with tempfile.TemporaryDirectory(prefix="sluice-ab-") as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        up_port = bp.free_port()
        upstream = bp.pinned(["nginx", "-c", str(bp.upstream_config(tmp, up_port))], other_cores)
        stack.enter_context(bp.started(upstream, tmp / "upstream.log"))
        bp.wait_http(f"http://127.0.0.1:{up_port}/")
        port = bp.free_port()
        peer = bp.pinned(["nginx", "-c", str(bp.peer_config(tmp, "nginx+log", port, up_port, log=True))], proxy_core)
        targets = [bp.Target("nginx+log", f"http://127.0.0.1:{port}/hello",
                             stack.enter_context(bp.started(peer, tmp / "peer.log")), tmp / "peer.log")]
        for name in names:
            for label, root in checkouts.items():
                port = bp.free_port()
                workdir = tmp / label
                workdir.mkdir(exist_ok=True)
                config = bp.sluice_config(workdir, name, port, up_port)
                cmd = bp.pinned([str(root / ".venv" / "bin" / "python"), "-m", "sluice.proxy", "run", "-c",
                                 str(config)], proxy_core)
                log = tmp / f"{label}-{name}.log"
                proc = stack.enter_context(bp.started(cmd, log, root))
                targets.append(bp.Target(f"{label}:{name}", f"http://127.0.0.1:{port}/hello", proc, log))
        bp.ready(targets)
        measured = bp.interleaved(targets, args.rounds, args.duration, args.warmup, 32, other_cores)
        if measured is None:
            return 1
        runs = measured

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    print(f"\n{'target':20s} {'req/s':>8s} {'p99':>8s} {'CPU/req':>8s} {'user':>7s} {'sys':>7s}")
    for name in runs:
        print(f"{name:20s} {med(name, 'rps'):8.0f} {med(name, 'p99_ms'):6.2f}ms {med(name, 'cpu_us'):6.1f}us "
              f"{med(name, 'user_us'):5.1f}us {med(name, 'sys_us'):5.1f}us")
    print()
    for name in names:
        before, after = med(f"before:{name}", "rps"), med(f"after:{name}", "rps")
        print(f"{name:14s} after/before {after / before:5.2f}   after/nginx {after / med('nginx+log', 'rps'):5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
