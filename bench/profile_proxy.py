#!/usr/bin/env python3
"""Where sluice's CPU time per request goes, under load: a sampling profile (py-spy) of one
sluice process in front of nginx `return 200`, turned into microseconds per request.

    python bench/profile_proxy.py [--target sluice+3] [--duration 10] [--top 30]

The target is one of bench_proxy.py's sluice targets (default: the three built-in filters, access
log on). The proxy is pinned to one core, nginx and wrk to the other, as in bench_proxy.py. Needs
`py-spy` (pip install py-spy), `wrk` and `nginx`.

Each sample's innermost Python frame is charged with the sample, so time spent in C (wasm code,
the kernel's send/recv, llhttp) is charged to the Python function that called into it; the
"layer" table groups functions by module. µs per request = share of busy samples x the process's
CPU time per request measured from /proc over the same interval.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_proxy import (  # noqa: E402
    PY,
    cores,
    cpu_seconds,
    free_port,
    pinned,
    run_wrk,
    sluice_config,
    started,
    upstream_config,
    wait_http,
)

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")

LAYERS: tuple[tuple[str, str], ...] = (
    ("sluice/abi/fastcall", "wasm calls and host-call trampolines (incl. time inside wasm)"),
    ("sluice/abi/hostcalls", "host calls (ABI functions)"),
    ("sluice/abi/", "host: plugin, VM, contexts, headers, properties"),
    ("sluice/proxy/chain", "filter chain"),
    ("sluice/proxy/logs", "access log"),
    ("sluice/proxy/", "proxy: connection, codec, exchange, routing, upstream"),
    ("sluice/", "sluice, other"),
    ("asyncio/", "asyncio"),
    ("uvloop", "uvloop"),
    ("httptools", "httptools"),
    ("aiohttp", "aiohttp"),
    ("logging/", "logging"),
)


def layer_of(path: str) -> str:
    for prefix, name in LAYERS:
        if prefix in path:
            return name
    return "other (stdlib, C)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="sluice+3",
                        choices=("sluice", "sluice-nolog", "sluice+noop", "sluice+as", "sluice+3"))
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "py-spy"):
        if not shutil.which(tool) and not (tool == "py-spy" and (Path(PY).parent / "py-spy").exists()):
            print(f"{tool} not found", file=sys.stderr)
            return 2
    pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    proxy_core, other_cores = cores()
    with tempfile.TemporaryDirectory(prefix="sluice-profile-") as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        up_port, port = free_port(), free_port()
        nginx = shutil.which("nginx") or "nginx"
        stack.enter_context(started(pinned([nginx, "-c", str(upstream_config(tmp, up_port))], other_cores),
                                    tmp / "upstream.log"))
        wait_http(f"http://127.0.0.1:{up_port}/")
        conf = sluice_config(tmp, args.target, port, up_port)
        proc = stack.enter_context(started(pinned([PY, "-m", "sluice.proxy", "run", "-c", str(conf)], proxy_core),
                                           tmp / "sluice.out"))
        url = f"http://127.0.0.1:{port}/hello"
        wait_http(url, proc=proc)
        run_wrk(url, 2, args.connections, other_cores)  # warm-up
        raw = tmp / "profile.txt"
        recorder = subprocess.Popen(
            pinned([pyspy, "record", "--format", "raw", "--rate", str(args.rate), "--nonblocking",
                    "--duration", str(args.duration + 2), "--pid", str(proc.pid), "--output", str(raw)],
                   other_cores),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        result: dict[str, float] = {}

        def load() -> None:
            before = cpu_seconds(proc.pid)
            result.update(run_wrk(url, args.duration, args.connections, other_cores))
            result["cpu_us"] = (cpu_seconds(proc.pid) - before) / max(result["requests"], 1.0) * 1e6

        loader = threading.Thread(target=load)
        loader.start()
        loader.join()
        _, err = recorder.communicate(timeout=60)
        if not raw.exists():
            print(f"py-spy wrote nothing: {err.decode()}", file=sys.stderr)
            return 1
        self_counts: collections.Counter[str] = collections.Counter()
        layer_counts: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack_text, _, count_text = line.rpartition(" ")
            if not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack_text.split(";")
            leaf = frames[-1]
            match = FRAME.match(leaf)
            path = match.group("file") if match else leaf
            func = f"{match.group('func')} ({Path(path).name})" if match else leaf
            self_counts[func] += count
            layer_counts[layer_of(path)] += count
            total += count
    cpu_us = result["cpu_us"]
    print(f"{args.target}: {result['rps']:.0f} req/s, {cpu_us:.1f} us CPU per request, {total} busy samples")
    print()
    print(f"{'us/req':>7s} {'share':>6s}  layer")
    for name, count in layer_counts.most_common():
        print(f"{cpu_us * count / total:7.1f} {count / total:6.1%}  {name}")
    print()
    print(f"{'us/req':>7s} {'share':>6s}  innermost Python function")
    for func, count in self_counts.most_common(args.top):
        print(f"{cpu_us * count / total:7.1f} {count / total:6.1%}  {func}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
