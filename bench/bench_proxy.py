#!/usr/bin/env python3
"""sluice against nginx, same machine, same fast upstream, same load, one run.

    python bench/bench_proxy.py [--duration 5] [--rounds 3] [--connections 32] [--only a,b,...]
    python bench/bench_proxy.py --json results.json       # also write every run as JSON

The upstream is nginx itself (`return 200`, one worker), so no row is capped by a slow upstream;
the peer is nginx `proxy_pass` with an upstream keep-alive pool (one worker). Targets:

  nginx          proxy_pass, access log off
  nginx+log      proxy_pass, access log to a file (buffer=64k)
  sluice         the default config: no filters, JSON access log to a file
  sluice-nolog   no filters, `access_log: null`
  sluice+noop    + a no-op filter (bench/noop_filter.wat: header callbacks that return Continue)
  sluice+as      + the AssemblyScript headers filter (tests/fixtures/as/build/headers.wasm)
  sluice+3       + auth, ratelimit, ab (the built-in filters; limit far above the load)
  sluice-h2up    (only with --only) sluice-nolog with the upstream as `protocol: http2`: nginx
                 over h2c with prior knowledge, one multiplexed connection
  sluice-pyup    (with --python-upstream) sluice without filters in front of the Python demo
                 upstream: an extra row, capped by that upstream

Every target runs from the start, pinned to one core (the proxy core); the upstream and wrk share
the other. Targets not being measured are stopped (SIGSTOP) so they take no CPU. Rounds are
interleaved (round 1: every target once, round 2: ...) and the median of the rounds is reported
(the ratios and differences at the end are taken within each round, then their median and range),
with the proxy process's own CPU time per request (user + system, from /proc; nginx: master +
worker), which is steadier than req/s on a shared machine, and its two parts: the system time is
the kernel's socket work, and it grows per request as the proxy's own (user) time does, since a
slower proxy finds fewer requests per wake-up. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import wasmtime

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
API_KEY = "bench-key"
FILTERS = ROOT / "sluice" / "filters"
AS_BUILD = ROOT / "tests" / "fixtures" / "as" / "build"

TARGETS = ("nginx", "nginx+log", "sluice", "sluice-nolog", "sluice+noop", "sluice+as", "sluice+3")
EXTRA_TARGETS = ("sluice-h2up",)
"""Run only when named in --only."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with status {proc.returncode}")
        try:
            req = urllib.request.Request(url, headers={"x-api-key": API_KEY})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


def process_tree(pid: int) -> list[int]:
    out, pending = [], [pid]
    while pending:
        current = pending.pop()
        out.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
    return out


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its children (nginx's worker), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for current in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11]) / tick
            system += int(fields[12]) / tick
    return user, system


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its children (nginx's worker), from /proc."""
    return sum(cpu_split(pid))


def cores() -> tuple[list[int] | None, list[int] | None]:
    """(proxy core, load+upstream cores), or (None, None) on a single core."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[-1:], available[:-1]


def pinned(cmd: list[str], on: list[int] | None) -> list[str]:
    if on and shutil.which("taskset"):
        return ["taskset", "-c", ",".join(map(str, on)), *cmd]
    return cmd


@dataclasses.dataclass
class Target:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def pause(self) -> None:
        for pid in process_tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in process_tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def started(cmd: list[str], log: Path, root: Path = ROOT) -> Iterator[subprocess.Popen[bytes]]:
    """`cmd` run from the checkout `root` (its `sluice` first on the path), output to `log`;
    ended by PID (SIGTERM, then SIGKILL after 20 s)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env)
    try:
        yield proc
    finally:
        for pid in process_tree(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- configs -----------------------------------------------------------------------------------


def nginx_dirs(tmp: Path, name: str) -> Path:
    prefix = tmp / name
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    return prefix


def nginx_common(prefix: Path) -> str:
    return f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
"""


def nginx_temp(prefix: Path) -> str:
    return f"""
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
"""


def upstream_config(tmp: Path, port: int, h2_port: int | None = None) -> Path:
    """nginx answering `hello` on `port` (HTTP/1.1) and, with `h2_port`, on that port over h2c."""
    prefix = nginx_dirs(tmp, "upstream")
    h2 = "" if h2_port is None else f"""
    server {{
        listen 127.0.0.1:{h2_port} http2 backlog=4096;
        http2_max_concurrent_streams 1024;
        location / {{ default_type text/plain; return 200 "hello from the upstream\\n"; }}
    }}"""
    path = prefix / "nginx.conf"
    path.write_text(
        nginx_common(prefix)
        + f"""
http {{
    access_log off;
    {nginx_temp(prefix)}
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "hello from the upstream\\n"; }}
    }}{h2}
}}
"""
    )
    return path


def peer_config(tmp: Path, name: str, port: int, upstream: int, log: bool) -> Path:
    prefix = nginx_dirs(tmp, name)
    access = f"access_log {prefix}/access.log combined buffer=64k flush=1s;" if log else "access_log off;"
    path = prefix / "nginx.conf"
    path.write_text(
        nginx_common(prefix)
        + f"""
http {{
    {access}
    {nginx_temp(prefix)}
    keepalive_requests 1000000;
    upstream up {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""
    )
    return path


def sluice_config(tmp: Path, name: str, port: int, upstream: int) -> Path:
    work = tmp / name
    work.mkdir()
    log = "null" if name in ("sluice-nolog", "sluice-h2up") else str(work / "access.log")
    protocol = "http2" if name == "sluice-h2up" else "http1"
    chain = ""
    if name == "sluice+noop":
        (work / "noop.wasm").write_bytes(wasmtime.wat2wasm((ROOT / "bench" / "noop_filter.wat").read_text()))
        chain = f"filters_dir: {work}\nchain:\n  - {{name: noop, module: noop.wasm}}\n"
    elif name == "sluice+as":
        chain = f"filters_dir: {AS_BUILD}\nchain:\n  - {{name: headers, module: headers.wasm}}\n"
    elif name == "sluice+3":
        chain = f"""filters_dir: {FILTERS}
chain:
  - name: auth
    module: auth.wasm
    config: {{api_keys: ["{API_KEY}"]}}
  - name: ratelimit
    module: ratelimit.wasm
    config: {{requests_per_second: 1000000, burst: 1000000}}
  - name: ab
    module: ab.wasm
    config: {{variants: {{a: 50, b: 50}}}}
"""
    path = work / "sluice.yaml"
    path.write_text(
        f"""
listen: 127.0.0.1:{port}
admin: {{listen: "127.0.0.1:{free_port()}"}}
access_log: {log}
cache_dir: {tmp / "cache"}
clusters:
  up: {{endpoints: ["127.0.0.1:{upstream}"], max_connections: 1024, protocol: {protocol}}}
routes:
  - match: {{prefix: /}}
    cluster: up
{chain}
"""
    )
    return path


# -- load --------------------------------------------------------------------------------------


def run_wrk(url: str, duration: float, connections: int, on: list[int] | None) -> dict[str, float]:
    cmd = pinned(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-H", f"x-api-key: {API_KEY}", url], on
    )
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    requests = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if requests is None or rps is None:
        raise RuntimeError(f"wrk said: {out}")

    def pct(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(rps.group(1)),
        "requests": float(requests.group(1)),
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "socket_errors": float(sum(int(g) for g in errors.groups())) if errors else 0.0,
    }


def measure(target: Target, duration: float, warmup: float, connections: int, on: list[int] | None) -> dict[str, float]:
    target.resume()
    try:
        if warmup:
            run_wrk(target.url, warmup, connections, on)
        user, system = cpu_split(target.proc.pid)
        run = run_wrk(target.url, duration, connections, on)
        after_user, after_system = cpu_split(target.proc.pid)
        per_request = 1e6 / max(run["requests"], 1.0)
        run["user_us"] = (after_user - user) * per_request
        run["sys_us"] = (after_system - system) * per_request
        run["cpu_us"] = run["user_us"] + run["sys_us"]
        return run
    finally:
        target.pause()


def ready(targets: list[Target], timeout: float = 60.0) -> None:
    """Wait until every target answers, then stop it (SIGSTOP) until its turn comes."""
    for target in targets:
        try:
            wait_http(target.url, timeout=timeout, proc=target.proc)
        except RuntimeError:
            print(target.log.read_text(), file=sys.stderr)
            raise
        target.pause()


def interleaved(
    targets: list[Target], rounds: int, duration: float, warmup: float, connections: int, on: list[int] | None
) -> dict[str, list[dict[str, float]]] | None:
    """Round 1: every target once, round 2: ...; each run printed as it ends. None when a target
    exited meanwhile (its output is printed)."""
    runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
    width = max(len(t.name) for t in targets)
    for round_no in range(1, rounds + 1):
        for target in targets:
            run = measure(target, duration, warmup, connections, on)
            runs[target.name].append(run)
            print(f"  round {round_no} {target.name:{width}s} {run['rps']:9.0f} req/s  {run['cpu_us']:6.1f} us CPU/req"
                  f" (user {run['user_us']:5.1f}, sys {run['sys_us']:5.1f})  p99 {run['p99_ms']:6.2f} ms", flush=True)
        for target in targets:
            if target.proc.poll() is not None:
                print(f"{target.name} exited with {target.proc.returncode}:\n{target.log.read_text()}", file=sys.stderr)
                return None
    return runs


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measured run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument("--python-upstream", action="store_true",
                        help="add sluice-pyup: sluice in front of the Python demo upstream (capped by it)")
    parser.add_argument("--json", type=Path, help="write every run to this file")
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            print(f"{tool} not found (apt-get install -y wrk nginx)", file=sys.stderr)
            return 2
    wanted = [t for t in args.only.split(",") if t]
    unknown = set(wanted) - set(TARGETS) - set(EXTRA_TARGETS)
    if unknown:
        print(f"unknown targets: {', '.join(sorted(unknown))} (known: {', '.join(TARGETS)})", file=sys.stderr)
        return 2
    proxy_core, other_cores = cores()
    print(f"proxy under test on CPU {proxy_core}; upstream and wrk on CPU {other_cores}")
    print(f"wrk -t1 -c{args.connections}, {args.rounds} interleaved rounds of {args.duration:g} s "
          f"(+{args.warmup:g} s warm-up each); medians")

    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        up_port, h2_port = free_port(), free_port()
        nginx = shutil.which("nginx") or "nginx"
        stack.enter_context(started(pinned([nginx, "-c", str(upstream_config(tmp, up_port, h2_port))], other_cores),
                                    tmp / "upstream.log"))
        wait_http(f"http://127.0.0.1:{up_port}/")
        targets: list[Target] = []
        for name in wanted:
            port = free_port()
            if name.startswith("nginx"):
                conf = peer_config(tmp, name, port, up_port, log=name == "nginx+log")
                cmd = [nginx, "-c", str(conf)]
            else:
                conf = sluice_config(tmp, name, port, h2_port if name == "sluice-h2up" else up_port)
                cmd = [PY, "-m", "sluice.proxy", "run", "-c", str(conf)]
            log = tmp / f"{name}.out"
            proc = stack.enter_context(started(pinned(cmd, proxy_core), log))
            targets.append(Target(name, f"http://127.0.0.1:{port}/hello", proc, log))
        if args.python_upstream:
            py_port = free_port()
            stack.enter_context(started(
                pinned([PY, str(ROOT / "examples" / "demo_upstream.py"), "--port", str(py_port), "--name", "bench"],
                       other_cores), tmp / "pyup.log"))
            wait_http(f"http://127.0.0.1:{py_port}/hello")
            port = free_port()
            conf = sluice_config(tmp, "sluice-pyup", port, py_port)
            proc = stack.enter_context(started(pinned([PY, "-m", "sluice.proxy", "run", "-c", str(conf)], proxy_core),
                                               tmp / "sluice-pyup.out"))
            targets.append(Target("sluice-pyup", f"http://127.0.0.1:{port}/hello", proc, tmp / "sluice-pyup.out"))
        ready(targets)
        runs = interleaved(targets, args.rounds, args.duration, args.warmup, args.connections, other_cores)
        if runs is None:
            return 1

    print()
    print(f"{'target':14s} {'req/s':>9s} {'p50':>8s} {'p99':>8s} {'CPU/req':>9s} {'user':>7s} {'sys':>7s}  notes")
    for name, target_runs in runs.items():
        bad = sum(r["non2xx"] + r["socket_errors"] for r in target_runs)
        note = "capped by the Python upstream" if name == "sluice-pyup" else ""
        if bad:
            note += f" {int(bad)} non-2xx/socket errors"
        print(f"{name:14s} {median(target_runs, 'rps'):9.0f} {median(target_runs, 'p50_ms'):6.2f}ms "
              f"{median(target_runs, 'p99_ms'):6.2f}ms {median(target_runs, 'cpu_us'):7.1f}us "
              f"{median(target_runs, 'user_us'):5.1f}us {median(target_runs, 'sys_us'):5.1f}us  {note}")

    # Each figure below is taken round by round (the two targets ran minutes apart at most, on the
    # same machine load) and the median of those is reported, with the range: on a shared machine
    # a ratio of two medians mixes rounds that other work slowed differently.
    def paired(a: str, b: str, of: Callable[[dict[str, float], dict[str, float]], float]) -> list[float] | None:
        if a not in runs or b not in runs:
            return None
        return [of(x, y) for x, y in zip(runs[a], runs[b], strict=True)]

    def show(label: str, values: list[float] | None, unit: str, target: str) -> None:
        if values is None:
            return
        middle, low, high = statistics.median(values), min(values), max(values)
        if unit == "%":
            figure = f"{middle:5.1%}    [{low:.1%} .. {high:.1%}]"
        elif unit == "us":
            figure = f"{middle:5.1f} us [{low:.1f} .. {high:.1f}]"
        else:
            figure = f"{middle:5.2f}    [{low:.2f} .. {high:.2f}]"
        print(f"{label:46s} {figure:26s} ({target})")

    def rps_ratio(x: dict[str, float], y: dict[str, float]) -> float:
        return x["rps"] / y["rps"]

    def cpu_added(x: dict[str, float], y: dict[str, float]) -> float:
        return x["cpu_us"] - y["cpu_us"]

    print()
    print(f"per round, median [range] of {args.rounds} rounds:")
    show("sluice (log on) / nginx proxy_pass (log on)", paired("sluice", "nginx+log", rps_ratio), "",
         "target >= 0.40, moonshot 0.55")
    show("sluice (log off) / nginx (log off)", paired("sluice-nolog", "nginx", rps_ratio), "", "for reference")
    show("p99 sluice / p99 nginx (log on)", paired("sluice", "nginx+log", lambda x, y: x["p99_ms"] / y["p99_ms"]),
         "", "target <= 2")
    show("sluice+3 / sluice (both log on)", paired("sluice+3", "sluice", rps_ratio), "",
         "target >= 0.50, moonshot 0.75")
    show("throughput lost to the access log", paired("sluice", "sluice-nolog", lambda x, y: 1 - x["rps"] / y["rps"]),
         "%", "target <= 10%")
    show("CPU added by a no-op filter", paired("sluice+noop", "sluice", cpu_added), "us", "target <= 5 us")
    show("CPU added by the AssemblyScript headers filter", paired("sluice+as", "sluice", cpu_added), "us",
         "target <= 25 us")
    show("CPU added per built-in filter (mean of 3)",
         paired("sluice+3", "sluice", lambda x, y: cpu_added(x, y) / 3), "us", "target <= 15 us, moonshot 8")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
