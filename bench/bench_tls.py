#!/usr/bin/env python3
"""TLS and HTTP/2: sluice's listener side against nginx, same certificate, same load, one run.

    python bench/bench_tls.py [--duration 5] [--rounds 3] [--connections 32] [--streams 10]
    python bench/bench_tls.py --only h2 --targets nginx-proxy,sluice     # HTTP/2 proxying only
    python bench/bench_tls.py --sluice https://127.0.0.1:8443/hello     # a sluice already running
    python bench/bench_tls.py --json results.json

Rows (each against every target that can answer it):

  tls-h1   keep-alive HTTP/1.1 over TLS, req/s          wrk -t1 -cN
  h2       keep-alive HTTP/2 over TLS (ALPN h2), req/s  h2load -cN -mS (S streams per connection)
  hs       new TLS handshakes per second (no request)   openssl s_time -new, 2 in parallel

Targets:

  nginx        one worker, `return 200`, `listen ... ssl http2`, access log off
  nginx-proxy  the same listener, `proxy_pass` to the upstream (keep-alive pool): what sluice does
  h2-codec     sluice's HTTP/2 downstream codec and driver (sluice.proxy.http2) behind
               sluice.proxy.tls (ServerTls, TlsAcceptor), answering 200 itself, on uvloop: the
               listener side of sluice without routing, filters or upstream. HTTP/2 only (ALPN h2),
               so no tls-h1 row.
  sluice       `sluice run`: a TLS listener with `alpn: [h2, http/1.1]`, no filters, no access
               log, proxying to the upstream; every row. With --sluice URL, that running sluice
               is measured instead (no CPU accounting).

The upstream (for nginx-proxy and sluice) is nginx `return 200` over plain HTTP/1.1, one worker.

The certificate (ECDSA P-256, made at run time with trustme) is the same for every target. Each
server is pinned to one core when there are two; the load tools share the other. Targets not
being measured are stopped (SIGSTOP). Rounds are interleaved, the median is reported, with the
server's CPU time per request (user + system from /proc). Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench_proxy import (
    cores,
    cpu_seconds,
    free_port,
    nginx_common,
    nginx_dirs,
    nginx_temp,
    pinned,
    process_tree,
    started,
    upstream_config,
)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ROWS = ("tls-h1", "h2", "hs")
TARGETS = ("nginx", "nginx-proxy", "h2-codec", "sluice")


# -- the h2-codec target (this script, run as a server) -----------------------------------------


def serve_h2(port: int, cert: Path, key: Path) -> None:
    import uvloop

    from sluice.proxy.http2.protocol import H2DownstreamProtocol, H2Stream
    from sluice.proxy.tls.acceptor import HandshakeStats, TlsAcceptor
    from sluice.proxy.tls.certs import CertificateSource
    from sluice.proxy.tls.server import ALPN_H2, ServerTls, ServerTlsSettings

    body = b"hello from sluice\n"
    head = [(":status", "200"), ("content-type", "text/plain"), ("content-length", str(len(body)))]

    async def answer(stream: H2Stream) -> None:
        while await stream.read_body() is not None:
            pass
        stream.send_response(head)
        await stream.send_data(body, end_stream=True)

    async def main() -> None:
        tls = ServerTls(ServerTlsSettings((CertificateSource(cert, key),), alpn=(ALPN_H2,)))
        stats = HandshakeStats()
        loop = asyncio.get_running_loop()
        # The planned listener path: TCP accept, handshake counted by TlsAcceptor, then HTTP/2.
        server = await loop.create_server(
            lambda: TlsAcceptor(tls, lambda: H2DownstreamProtocol(answer), stats), "127.0.0.1", port, backlog=4096
        )
        print(f"listening on 127.0.0.1:{port}", flush=True)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# -- setup -----------------------------------------------------------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path]:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("bench.test", "127.0.0.1")
    cert, key = directory / "bench.crt", directory / "bench.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


def nginx_tls_config(tmp: Path, port: int, cert: Path, key: Path, upstream: int | None = None) -> Path:
    """nginx terminating TLS (HTTP/1.1 and h2): answering itself, or proxying to `upstream`."""
    prefix = nginx_dirs(tmp, "nginx-tls" if upstream is None else "nginx-tls-proxy")
    path = prefix / "nginx.conf"
    if upstream is None:
        location = 'location / { default_type text/plain; return 200 "hello from nginx\\n"; }'
        pool = ""
    else:
        location = (
            "location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; "
            "proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }"
        )
        pool = f"upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}"
    path.write_text(
        nginx_common(prefix)
        + f"""
http {{
    access_log off;
    {nginx_temp(prefix)}
    keepalive_requests 1000000;
    http2_max_requests 1000000;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    {pool}
    server {{
        listen 127.0.0.1:{port} ssl http2 backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        {location}
    }}
}}
"""
    )
    return path


def sluice_tls_config(tmp: Path, port: int, cert: Path, key: Path, upstream: int) -> Path:
    work = tmp / "sluice"
    work.mkdir()
    path = work / "sluice.yaml"
    path.write_text(
        f"""
listen:
  - address: 127.0.0.1:{port}
    tls:
      certificates: [{{cert: {cert}, key: {key}}}]
      alpn: [h2, http/1.1]
admin: {{listen: "127.0.0.1:{free_port()}"}}
access_log: null
cache_dir: {tmp / "cache"}
clusters:
  up: {{endpoints: ["127.0.0.1:{upstream}"], max_connections: 1024}}
routes:
  - match: {{prefix: /}}
    cluster: up
"""
    )
    return path


def wait_tls(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"port {port}: the server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 2) as raw, ctx.wrap_socket(raw):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {port} did not come up") from None
            time.sleep(0.1)


@dataclasses.dataclass
class Target:
    name: str
    url: str
    proc: subprocess.Popen[bytes] | None
    """None for an external sluice: no pausing, no CPU accounting."""
    rows: tuple[str, ...]

    def send(self, sig: int) -> None:
        if self.proc is None:
            return
        for pid in process_tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


# -- load tools ----------------------------------------------------------------------------------


def run_wrk(url: str, duration: float, connections: int, on: list[int] | None) -> dict[str, float]:
    cmd = pinned(["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", url], on)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    requests = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if requests is None or rps is None:
        raise RuntimeError(f"wrk said: {out}")
    return {
        "rate": float(rps.group(1)),
        "count": float(requests.group(1)),
        "errors": float(sum(int(g) for g in errors.groups()) if errors else 0)
        + float(non2xx.group(1) if non2xx else 0),
    }


def run_h2load(url: str, requests: int, connections: int, streams: int, on: list[int] | None) -> dict[str, float]:
    """A fixed number of requests: h2load's duration mode (-D) was seen to keep some clients
    running well past the duration against a slower server, so the count is sized from a
    calibration run instead (see `measure`)."""
    cmd = pinned(["h2load", "-n", str(requests), "-c", str(connections), "-m", str(streams), url], on)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300).stdout
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if rate is None or done is None:
        raise RuntimeError(f"h2load said: {out}")
    if proto is None or proto.group(1) != "h2":
        raise RuntimeError(f"h2load did not speak h2: {out}")
    failed = float(done.group(3)) + float(done.group(4))
    return {"rate": float(rate.group(1)), "count": float(done.group(2)), "errors": failed}


def run_s_time(port: int, duration: float, parallel: int, on: list[int] | None) -> dict[str, float]:
    """New full handshakes (no session reuse, no request), `parallel` clients at once.

    The rate is connections over the wall time measured here: s_time's own "real seconds" is
    rounded to whole seconds."""
    seconds = str(max(1, round(duration)))
    cmd = pinned(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", seconds], on)
    start = time.monotonic()
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(parallel)
    ]
    count = 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=duration + 30)
        m = re.search(r"(\d+) connections in [\d.]+ real seconds", out)
        if m is None:
            raise RuntimeError(f"s_time said: {out}")
        count += float(m.group(1))
    return {"rate": count / (time.monotonic() - start), "count": count, "errors": 0.0}


def measure(target: Target, row: str, args: argparse.Namespace, on: list[int] | None) -> dict[str, float]:
    port = int(target.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    target.send(signal.SIGCONT)
    try:
        h2_requests = args.connections * args.streams * 20

        def once(duration: float) -> dict[str, float]:
            if row == "tls-h1":
                return run_wrk(target.url, duration, args.connections, on)
            if row == "h2":
                return run_h2load(target.url, h2_requests, args.connections, args.streams, on)
            return run_s_time(port, duration, 2, on)

        if row == "h2":
            # Calibrate: about `duration` seconds' worth of requests at this target's rate.
            probe = once(args.warmup)
            h2_requests = max(h2_requests, int(probe["rate"] * args.duration))
        elif args.warmup:
            once(args.warmup)
        before = cpu_seconds(target.proc.pid) if target.proc is not None else 0.0
        result = once(args.duration)
        if target.proc is not None:
            result["cpu_us"] = (cpu_seconds(target.proc.pid) - before) / max(result["count"], 1.0) * 1e6
        return result
    finally:
        target.send(signal.SIGSTOP)


# -- main ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def targets(
    tmp: Path, args: argparse.Namespace, on: list[int] | None, load: list[int] | None
) -> Iterator[list[Target]]:
    cert, key = make_certificate(tmp)
    wanted = set(args.targets.split(",")) if args.targets else set(TARGETS)
    found: list[Target] = []
    nginx = shutil.which("nginx") or "nginx"
    with contextlib.ExitStack() as stack:
        up_port = free_port()
        if wanted & {"nginx-proxy", "sluice"}:
            # The upstream shares the load tools' core, like bench_proxy.py's.
            stack.enter_context(started(pinned([nginx, "-c", str(upstream_config(tmp, up_port))], load),
                                        tmp / "upstream.log"))
        for name, upstream in (("nginx", None), ("nginx-proxy", up_port)):
            if name not in wanted:
                continue
            port = free_port()
            conf = nginx_tls_config(tmp, port, cert, key, upstream)
            proc = stack.enter_context(started(pinned([nginx, "-c", str(conf)], on), tmp / f"{name}.log"))
            wait_tls(port, proc)
            found.append(Target(name, f"https://127.0.0.1:{port}/", proc, ROWS))
        if "h2-codec" in wanted:
            h2_port = free_port()
            cmd = [PY, str(Path(__file__).resolve()), "--serve-h2", str(h2_port), str(cert), str(key)]
            proc = stack.enter_context(started(pinned(cmd, on), tmp / "h2-codec.log"))
            wait_tls(h2_port, proc)
            found.append(Target("h2-codec", f"https://127.0.0.1:{h2_port}/", proc, ("h2", "hs")))
        if args.sluice:
            found.append(Target("sluice", args.sluice, None, ROWS))
        elif "sluice" in wanted:
            port = free_port()
            conf = sluice_tls_config(tmp, port, cert, key, up_port)
            cmd = [PY, "-m", "sluice.proxy", "run", "-c", str(conf)]
            proc = stack.enter_context(started(pinned(cmd, on), tmp / "sluice.log"))
            wait_tls(port, proc)
            found.append(Target("sluice", f"https://127.0.0.1:{port}/", proc, ROWS))
        for target in found:
            target.send(signal.SIGSTOP)  # until measured
        yield found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--streams", type=int, default=10, help="h2load -m: concurrent streams per connection")
    parser.add_argument("--sluice", help="URL of a running sluice TLS listener to measure as well")
    parser.add_argument("--only", help="comma-separated rows: " + ",".join(ROWS))
    parser.add_argument("--targets", help="comma-separated targets: " + ",".join(TARGETS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve-h2", nargs=3, metavar=("PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_h2:
        serve_h2(int(args.serve_h2[0]), Path(args.serve_h2[1]), Path(args.serve_h2[2]))
        return 0
    for tool, package in (("wrk", "wrk"), ("h2load", "nghttp2-client"), ("nginx", "nginx"), ("openssl", "openssl")):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install -y {package})", file=sys.stderr)
            return 2
    rows = tuple(args.only.split(",")) if args.only else ROWS
    server_core, load_cores = cores()
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmpdir, targets(
        Path(tmpdir), args, server_core, load_cores
    ) as found:
        for round_no in range(args.rounds):
            for row in rows:
                for target in found:
                    if row not in target.rows:
                        continue
                    result = measure(target, row, args, load_cores)
                    runs.setdefault((row, target.name), []).append(result)
                    print(
                        f"round {round_no + 1} {row:7s} {target.name:11s} {result['rate']:10.0f}/s"
                        + (f"  {result['cpu_us']:7.1f} us CPU each" if "cpu_us" in result else "")
                        + (f"  errors {result['errors']:.0f}" if result["errors"] else ""),
                        flush=True,
                    )
    print()
    print(f"{'row':8s} {'target':12s} {'median/s':>10s} {'CPU each':>10s}")
    summary: dict[str, dict[str, float]] = {}
    for (row, name), results in runs.items():
        rate = statistics.median(r["rate"] for r in results)
        cpu = [r["cpu_us"] for r in results if "cpu_us" in r]
        cpu_text = f"{statistics.median(cpu):7.1f} us" if cpu else ""
        print(f"{row:8s} {name:12s} {rate:10.0f} {cpu_text:>10s}")
        summary[f"{row}/{name}"] = {"rate": rate, **({"cpu_us": statistics.median(cpu)} if cpu else {})}
    for row in rows:
        base = summary.get(f"{row}/nginx")
        for name in ("nginx-proxy", "h2-codec", "sluice"):
            other = summary.get(f"{row}/{name}")
            if base and other:
                print(f"{row}: {name} / nginx = {other['rate'] / base['rate']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": {f"{r}/{n}": v for (r, n), v in runs.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
