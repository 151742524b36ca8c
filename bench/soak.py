#!/usr/bin/env python3
"""Soak: mixed traffic through the three built-in filters for a long time, with a filter swap
every few seconds; watches the proxy for leaks (issue 13).

    python bench/soak.py [--duration 600] [--clients 8] [--swap-every 10] [--report-every 30]

What runs (everything on 127.0.0.1):

* the demo upstream (examples/demo_upstream.py) in this process, behind two clusters (stable and
  canary, as the default config has them);
* the proxy in a child process (this script with `--proxy CONFIG`: a `Gateway` and the admin API
  on uvloop, as `sluice run` runs them), with the chain auth -> ratelimit -> ab. Every second it
  prints one JSON line: asyncio tasks, open file descriptors, RSS and generation number;
* `--clients` workers, each sending a mix: valid requests (200), requests without a key (401),
  requests on one hot key far over its rate (429), 1 MiB uploads and downloads, and aborts (a
  client that closes after half a body, one that gives up waiting for a slow answer);
* every `--swap-every` seconds the ab filter's config is rewritten (its weights flip), which hot
  reloads that filter; the swap latency is the time from the file write to the admin API
  reporting the new generation.

Every `--report-every` seconds one line: requests so far, RSS, open fds and asyncio tasks of the
proxy. At the end: requests by status, the RSS series with its spread after warm-up (the first
report), fd and task counts first/last, swap latencies. Exit status 1 if a request got an answer
the mix does not expect (a 5xx, a connection error outside the aborts) or no swap completed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

SUBJECTS = 200
DEADLINE_MS = 200
"""The filters' CPU deadline: ten times the default, because the load, the upstream and the proxy
share the machine here and a descheduled callback must not turn into a 503 (a soak looks for
leaks, not for scheduling noise)."""
HOT_KEY = "hot-key"
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, port: int, admin_port: int, upstream: str, flip: bool) -> None:
    from sluice import BUILTIN_FILTERS_DIR

    keys = ", ".join(f'{{key: "key-{i}", subject: "s{i}"}}' for i in range(SUBJECTS))
    weights = "{stable: 70, canary: 30}" if flip else "{stable: 30, canary: 70}"
    text = f"""
listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin_port}}}
access_log: null
filters_dir: {BUILTIN_FILTERS_DIR}
cache_dir: {path.parent / "cache"}
clusters:
  web: {{endpoints: ["{upstream}"]}}
  web-canary: {{endpoints: ["{upstream}"]}}
chain:
  - name: auth
    module: auth.wasm
    cpu_deadline_ms: {DEADLINE_MS}
    config:
      api_keys: [{keys}, {{key: "{HOT_KEY}", subject: hot}}]
  - name: ratelimit
    module: ratelimit.wasm
    cpu_deadline_ms: {DEADLINE_MS}
    config: {{requests_per_second: 20, burst: 40, key: subject}}
  - name: ab
    module: ab.wasm
    cpu_deadline_ms: {DEADLINE_MS}
    config: {{variants: {weights}, header: x-variant, key: subject}}
routes:
  - name: canary
    match: {{prefix: /, headers: {{x-variant: canary}}}}
    cluster: web-canary
  - name: default
    match: {{prefix: /}}
    cluster: web
"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # one event for the watcher, never a half-written file


# -- the proxy (child process) ------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> tuple[int, int]:
    """(RSS bytes, open fds) of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def run_proxy(config_path: Path) -> None:
    from sluice.proxy.admin import AdminServer
    from sluice.proxy.app import Gateway
    from sluice.proxy.config import load_config

    gateway = Gateway(load_config(config_path))
    await gateway.start()
    admin = AdminServer(gateway)
    await admin.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        rss, fds = proc_status()
        gen = gateway.current_generation()
        report = {"tasks": len(asyncio.all_tasks()), "fds": fds, "rss": rss, "generation": gen.number if gen else 0}
        print(json.dumps(report), flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    await gateway.stop(2.0)
    await admin.stop()


# -- the load (this process) --------------------------------------------------------------------


class Load:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.port = port
        self.statuses: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.stop = False

    def note(self, kind: str, outcome: str, expected: set[str]) -> None:
        self.statuses[outcome] += 1
        if outcome not in expected:
            self.unexpected[f"{kind}:{outcome}"] += 1

    async def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        big = b"u" * MIB
        async with aiohttp.ClientSession() as s:
            while not self.stop:
                pick = rng.random()
                key = f"key-{rng.randrange(SUBJECTS)}"
                try:
                    if pick < 0.55:
                        async with s.get(f"{self.base}/anything", headers={"x-api-key": key}) as r:
                            await r.read()
                            self.note("valid", str(r.status), {"200", "429"})
                    elif pick < 0.65:
                        async with s.get(f"{self.base}/anything") as r:
                            await r.read()
                            self.note("nokey", str(r.status), {"401"})
                    elif pick < 0.77:
                        async with s.get(f"{self.base}/hello", headers={"x-api-key": HOT_KEY}) as r:
                            await r.read()
                            self.note("hot", str(r.status), {"200", "429"})
                    elif pick < 0.83:
                        async with s.post(f"{self.base}/anything", data=big, headers={"x-api-key": key}) as r:
                            body = await r.json()
                            ok = r.status == 200 and body["body_size"] == MIB
                            self.note("upload", str(r.status) if ok or r.status != 200 else "bad-echo", {"200", "429"})
                    elif pick < 0.89:
                        url = f"{self.base}/bytes?size={MIB}"
                        async with s.get(url, headers={"x-api-key": key}) as r:
                            data = await r.read()
                            ok = r.status != 200 or len(data) == MIB
                            self.note("download", str(r.status) if ok else "short", {"200", "429"})
                    elif pick < 0.95:
                        await self.abort_upload(key)
                        self.note("abort", "abort", {"abort"})
                    else:
                        with contextlib.suppress(TimeoutError):
                            timeout = aiohttp.ClientTimeout(total=0.05)
                            async with s.get(
                                f"{self.base}/slow?ms=1000", headers={"x-api-key": key}, timeout=timeout
                            ) as r:
                                await r.read()
                        self.note("abort", "abort", {"abort"})
                except aiohttp.ClientError as exc:
                    self.note("any", type(exc).__name__, set())

    async def abort_upload(self, key: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(
            b"POST /anything HTTP/1.1\r\nHost: soak\r\nX-Api-Key: %s\r\nContent-Length: 200000\r\n\r\n" % key.encode()
            + b"a" * 100_000
        )
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.transport.abort()


async def generation(session: aiohttp.ClientSession, admin: str) -> int:
    async with session.get(f"{admin}/stats") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("sluice_generation "):
                return int(float(line.split()[1]))
    return 0


async def main(args: argparse.Namespace) -> int:
    from demo_upstream import create_app

    # The aborted uploads make the demo upstream log a traceback each (its request was cut).
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

    runner = web.AppRunner(create_app("soak"), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
    work = Path(tempfile.mkdtemp(prefix="sluice-soak-"))
    config_path = work / "sluice.yaml"
    port, admin_port = free_port(), free_port()
    flip = False
    write_config(config_path, port, admin_port, f"127.0.0.1:{up_port}", flip)
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--proxy", str(config_path), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    latest: dict[str, Any] = {}

    async def read_reports() -> None:
        assert child.stdout is not None
        while line := await child.stdout.readline():
            latest.update(json.loads(line))

    reader = asyncio.ensure_future(read_reports())
    admin = f"http://127.0.0.1:{admin_port}"
    load = Load(port)
    swaps: list[float] = []
    failed_swaps = 0
    samples: list[tuple[float, int, int, int]] = []
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    if await generation(s, admin) >= 1:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit("the proxy did not start")
                await asyncio.sleep(0.1)
            print(f"proxy pid {child.pid} on :{port}, admin :{admin_port}, upstream :{up_port}; "
                  f"{args.duration:g}s, {args.clients} clients", flush=True)
            workers = [asyncio.ensure_future(load.worker(i)) for i in range(args.clients)]
            started = time.monotonic()
            next_swap = started + args.swap_every
            next_report = started + args.report_every
            end = started + args.duration
            while (now := time.monotonic()) < end:
                if now >= next_swap:
                    before = await generation(s, admin)
                    flip = not flip
                    t0 = time.monotonic()
                    write_config(config_path, port, admin_port, f"127.0.0.1:{up_port}", flip)
                    while await generation(s, admin) <= before:
                        if time.monotonic() - t0 > 10:
                            failed_swaps += 1
                            break
                        await asyncio.sleep(0.005)
                    else:
                        swaps.append(time.monotonic() - t0)
                    next_swap += args.swap_every
                if now >= next_report:
                    rss, fds = proc_status(child.pid)
                    tasks = int(latest.get("tasks", -1))
                    samples.append((now - started, rss, fds, tasks))
                    total = sum(load.statuses.values())
                    print(f"t={now - started:6.0f}s  requests={total:8d}  rss={rss / MIB:7.1f} MiB  "
                          f"fds={fds:4d}  tasks={tasks:4d}  generation={latest.get('generation')}", flush=True)
                    next_report += args.report_every
                await asyncio.sleep(0.05)
            load.stop = True
            await asyncio.gather(*workers, return_exceptions=True)
            elapsed = time.monotonic() - started
            await asyncio.sleep(1.5)  # let the idle state show
            rss, fds = proc_status(child.pid)
            samples.append((elapsed, rss, fds, int(latest.get("tasks", -1))))
    finally:
        if child.returncode is None:
            child.terminate()
            await child.wait()
        reader.cancel()
        await runner.cleanup()

    total = sum(load.statuses.values())
    print(f"\n{total} requests in {elapsed:.0f}s ({total / elapsed:.0f}/s)")
    print("by outcome: " + ", ".join(f"{k}: {v}" for k, v in sorted(load.statuses.items())))
    if load.unexpected:
        print("UNEXPECTED: " + ", ".join(f"{k}: {v}" for k, v in sorted(load.unexpected.items())))
    print("RSS (MiB): " + " ".join(f"{r / MIB:.1f}" for _, r, _, _ in samples))
    if len(samples) >= 2:
        after = [r for _, r, _, _ in samples[1:]] or [samples[0][1]]
        spread = (max(after) - min(after)) / min(after) * 100
        print(f"RSS after warm-up (from t={samples[1][0]:.0f}s): min {min(after) / MIB:.1f}, "
              f"max {max(after) / MIB:.1f} MiB, spread {spread:.1f}%")
    print("open fds: " + " ".join(str(f) for _, _, f, _ in samples))
    print("asyncio tasks: " + " ".join(str(t) for _, _, _, t in samples))
    if swaps:
        ms = sorted(x * 1000 for x in swaps)
        print(f"swaps: {len(swaps)} ok, {failed_swaps} failed; latency ms min {ms[0]:.0f}, "
              f"median {statistics.median(ms):.0f}, max {ms[-1]:.0f}")
    else:
        print(f"swaps: none completed ({failed_swaps} failed)")
    return 1 if load.unexpected or not swaps or failed_swaps else 0


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--swap-every", type=float, default=10.0, help="seconds between filter swaps")
    parser.add_argument("--report-every", type=float, default=30.0, help="seconds between RSS/fd/task lines")
    parser.add_argument("--proxy", type=Path, help=argparse.SUPPRESS)  # the child: serve this config
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if args.proxy is not None:
        if uvloop is not None:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(run_proxy(args.proxy))
        else:
            asyncio.run(run_proxy(args.proxy))
        return 0
    return asyncio.run(main(args))


if __name__ == "__main__":
    sys.exit(cli())
