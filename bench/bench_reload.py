"""Hot-reload benchmark: swap a ~100 KB filter under steady keep-alive load against `sluice run`.

    python bench/bench_reload.py [--clients 8] [--swaps 50] [--cold 20] [--rss-swaps 200]

What it does (everything on 127.0.0.1):

* starts an aiohttp upstream in this process and `python -m sluice.proxy run -c <tmp>/sluice.yaml` as a
  child process (the real entry point: uvloop, frozen start-up heap, raised GC thresholds);
* keeps `--clients` aiohttp clients busy, each on one keep-alive connection, counting failed
  requests, reconnections (a reset or closed keep-alive connection shows up as a new connection)
  and the `x-version` each response carries (exactly one per response, or it counts as failed);
* swaps `filters/ver.wasm` (tests/fixtures/wat/versioned.wat padded with a custom section to
  ~100 KB) by atomic rename and measures the time from the rename to the first response showing
  the new version, seen by a probe client polling in a loop:
  - warm: `--swaps` swaps alternating between two modules whose compiled code is in the cache;
  - cold: `--cold` swaps to modules never seen before (unique bytes: a cache miss, full compile);
* swaps `--rss-swaps` more times (warm) and reports the proxy's RSS growth (VmRSS of the child),
  measured against a baseline taken after the first 10 swaps.

Prints one table; exit status 1 if any request failed or a connection was reset.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import wasmtime
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
WAT = ROOT / "tests" / "fixtures" / "wat" / "versioned.wat"
MODULE_SIZE = 100_000


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _custom_section(name: bytes, payload: bytes) -> bytes:
    body = _leb(len(name)) + name + payload
    return b"\0" + _leb(len(body)) + body


def _code_padding(functions: int) -> str:
    """`functions` small functions (never called, but compiled like any other code)."""
    out = []
    for i in range(functions):
        out.append(
            f"(func (param i32 i32) (result i32) local.get 0 i32.const {i} i32.add local.get 1 i32.mul "
            f"i32.const {i * 7 + 1} i32.xor i32.const 13 i32.rotl local.get 0 i32.const {i * 3 + 5} "
            "i32.shr_u i32.or local.get 1 i32.add)"
        )
    return "\n".join(out)


def build_filter(version: str, salt: bytes = b"", size: int = MODULE_SIZE, code: bool = True) -> bytes:
    """The versioned test filter grown to about `size` bytes: with compiled code (`code`, the
    default: a realistic compile) or with a custom section (no extra code). `salt` (a small custom
    section) makes the bytes, and so the cache key, unique."""
    text = WAT.read_text().replace("@VERSION_LEN@", str(len(version))).replace("@VERSION@", version)
    text = text.replace("@CONFIGURE@", "1")
    if code:
        probe = len(bytes(wasmtime.wat2wasm(text.rstrip()[:-1] + _code_padding(100) + ")")))
        base = len(bytes(wasmtime.wat2wasm(text)))
        per_function = (probe - base) / 100
        text = text.rstrip()[:-1] + _code_padding(int((size - base) / per_function)) + ")"
    wasm = bytes(wasmtime.wat2wasm(text))
    if salt:
        wasm += _custom_section(b"salt", salt)
    if not code and size > len(wasm) + 16:
        wasm += _custom_section(b"padding", b"\0" * (size - len(wasm) - 16))
    return wasm


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Load:
    """Clients on one keep-alive connection each, requesting in a loop until stopped."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.clients = clients
        self.versions: Counter[str] = Counter()
        self.failures: list[str] = []
        self.connections = [0] * clients
        self.requests = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def reset_counts(self) -> None:
        self.versions.clear()

    async def _client(self, index: int) -> None:
        trace = aiohttp.TraceConfig()

        async def created(*_: Any) -> None:
            self.connections[index] += 1

        trace.on_connection_create_end.append(created)
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
            while not self._stop.is_set():
                try:
                    async with session.get(self.url) as resp:
                        body = await resp.read()
                        seen = resp.headers.getall("x-version", [])
                        self.requests += 1
                        if resp.status != 200 or body != b"ok" or len(seen) != 1:
                            self.failures.append(f"{resp.status} {seen} {body[:60]!r}")
                        else:
                            self.versions[seen[0]] += 1
                except (aiohttp.ClientError, OSError) as exc:
                    self.failures.append(repr(exc))
                    await asyncio.sleep(0.01)

    @property
    def reconnects(self) -> int:
        return sum(max(0, c - 1) for c in self.connections)


async def swap(probe: aiohttp.ClientSession, url: str, module: Path, data: bytes, version: str) -> float:
    """Atomic-rename `data` over `module`; seconds until a response shows `version`."""
    tmp = module.with_name(".ver.wasm.tmp")
    tmp.write_bytes(data)
    started = time.perf_counter()
    os.replace(tmp, module)
    deadline = started + 30
    while True:
        async with probe.get(url) as resp:
            await resp.read()
            if resp.headers.getall("x-version", []) == [version]:
                return time.perf_counter() - started
        if time.perf_counter() > deadline:
            raise RuntimeError(f"version {version} not served 30 s after the rename")


def compile_times(path: Path, cache: Path) -> tuple[float, float, int]:
    """Milliseconds to compile `path` with an empty cache, then from the cache; its size."""
    from sluice.abi import Runtime

    runtime = Runtime(cache_dir=cache)
    try:
        started = time.perf_counter()
        module = runtime.compile(path)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        runtime.compile(path)
        warm = time.perf_counter() - started
        return cold * 1000, warm * 1000, module.size
    finally:
        runtime.close()


def _ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-reload-"))
    (work / "filters").mkdir()
    module = work / "filters" / "ver.wasm"
    v1, v2 = build_filter("1"), build_filter("2")
    module.write_bytes(v1)

    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up_port = int(runner.addresses[0][1])

    port = free_port()
    (work / "sluice.yaml").write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'admin: {{listen: "127.0.0.1:{free_port()}"}}\n'
        "access_log: null\nfilters_dir: filters\ncache_dir: cache\n"
        f'clusters: {{up: {{endpoints: ["127.0.0.1:{up_port}"]}}}}\n'
        "chain: [{name: ver, module: ver.wasm}]\n"
        "routes: [{match: {prefix: /}, cluster: up}]\n"
    )
    log_file = open(work / "sluice.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.proxy", "run", "-c", str(work / "sluice.yaml")],
        cwd=ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    status = 0
    try:
        async with aiohttp.ClientSession() as probe:
            for _ in range(300):
                try:
                    async with probe.get(url) as resp:
                        await resp.read()
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"sluice did not start; see {work / 'sluice.log'}")
            rss_start = rss_kib(proc.pid)

            load = Load(url, args.clients)
            load.start()
            await asyncio.sleep(1.0)
            rss_loaded = rss_kib(proc.pid)

            # warm: the first two swaps compile v2 and v1 into the cache; they are not counted.
            await swap(probe, url, module, v2, "2")
            await swap(probe, url, module, v1, "1")
            load.reset_counts()
            warm = []
            for i in range(args.swaps):
                version = "2" if i % 2 == 0 else "1"
                warm.append(await swap(probe, url, module, v2 if version == "2" else v1, version))
            warm_versions = dict(load.versions)

            cold = []
            for i in range(args.cold):
                version = "2" if i % 2 == 0 else "1"
                data = build_filter(version, salt=f"cold-{i}-{time.time_ns()}".encode())
                cold.append(await swap(probe, url, module, data, version))

            version = "1" if cold and args.cold % 2 == 1 else "2"
            rss_base = 0
            for i in range(args.rss_swaps):
                version = "2" if version == "1" else "1"
                await swap(probe, url, module, v2 if version == "2" else v1, version)
                if i == 9:
                    await asyncio.sleep(1.0)  # let the retired generations be collected
                    rss_base = rss_kib(proc.pid)
            await asyncio.sleep(1.5)
            rss_end = rss_kib(proc.pid)
            await load.stop()

        swaps_total = 2 + args.swaps + args.cold + args.rss_swaps
        print(f"sluice hot reload: {args.clients} keep-alive clients, {swaps_total} swaps by atomic rename")
        print(f"  module: {len(v1)} bytes (versioned.wat + {len(v1) // 1024} KiB of code to compile)")
        print(f"  requests: {load.requests}, failed: {len(load.failures)}, reset connections: {load.reconnects}")
        print(f"  versions seen during the {args.swaps} warm swaps: {warm_versions}")
        print(f"  swap latency, rename -> first response with the new version (warm cache, {args.swaps}): "
              f"{_ms(warm)}")
        if cold:
            print(f"  swap latency (cold: new module bytes, full compile, {args.cold}): {_ms(cold)}")
        growth = (rss_end - rss_base) / rss_base * 100 if rss_base else 0.0
        print(f"  RSS: {rss_start / 1024:.1f} MiB idle, {rss_loaded / 1024:.1f} MiB under load before any swap, "
              f"{rss_base / 1024:.1f} MiB after 10 swaps (baseline), {rss_end / 1024:.1f} MiB after "
              f"{args.rss_swaps} more: {growth:+.1f}% (vs before any swap: "
              f"{(rss_end - rss_loaded) / rss_loaded * 100:+.1f}%)")
        cold_ms, warm_ms, size = compile_times(ROOT / "filters" / "auth.wasm", work / "compile-cache")
        print(f"  for comparison, filters/auth.wasm ({size} bytes, the largest built-in filter): compile "
              f"{cold_ms:.0f} ms cold, {warm_ms:.1f} ms from the cache (what a cold swap of it adds)")
        for failure in load.failures[:5]:
            print(f"  failure: {failure}")
        if load.failures or load.reconnects:
            status = 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
        await runner.cleanup()
    if status == 0 and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"  (proxy log: {work / 'sluice.log'})")
    return status


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument("--cold", type=int, default=20)
    parser.add_argument("--rss-swaps", type=int, default=200)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (config, log)")
    raise SystemExit(asyncio.run(main(parser.parse_args())))
