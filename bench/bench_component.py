"""Benchmark of component filters (issue 15): per-request cost and compile time.

Measures, in one run:
  * compile of tests/fixtures/components/build/counter.wasm, cold and from the on-disk cache;
  * one request through the counter component via `ComponentPlugin` — stream create,
    `on-request` with 10 headers (one log, one shared-data get and set, one header edit
    applied), `on-response` (one header added), complete — through the component half of the
    fast-call layer (sluice/abi/fastcall_component.py);
  * for scale, one `on-request` call through wasmtime-py's public component API is not
    measured here: its values cannot express `result<option<entry>, error>` (see the module
    docstring of fastcall_component), so it cannot run this world at all.

Medians of --rounds rounds of --requests requests each (the machine may be shared: medians).

Usage:  python bench/bench_component.py [--requests 5000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sluice import abi  # noqa: E402

COUNTER = ROOT / "tests" / "fixtures" / "components" / "build" / "counter.wasm"
TARGET_REQUEST_US = 30.0
TARGET_CACHED_COMPILE_MS = 50.0


class _NullHost:
    def http_call(self, *args: Any) -> bool:
        return False

    def call_later(self, delay_s: float, callback: Any) -> Any:
        return None

    def log(self, plugin: str, level: abi.LogLevel, message: str) -> None:
        pass


class _Callbacks:
    def continue_request(self) -> None: ...
    def continue_response(self) -> None: ...
    def send_local_reply(self, reply: abi.LocalReply) -> None: ...
    def reset(self) -> None: ...


def request_headers() -> abi.HeaderMap:
    return abi.HeaderMap(
        [(":method", "GET"), (":scheme", "http"), (":authority", "example.com"), (":path", "/api/v1/items?id=42"),
         ("user-agent", "bench/1.0"), ("accept", "application/json"), ("accept-encoding", "gzip, br"),
         ("x-request-id", "7f0c6a2e-3d5b-4c1a-9e8f-0a1b2c3d4e5f"), ("cookie", "session=abcdef0123456789"),
         ("x-forwarded-for", "10.0.0.1")]
    )


def one_round(plugin: Any, requests: int) -> float:
    info = abi.StreamInfo()
    callbacks = _Callbacks()
    template = request_headers()
    response = abi.HeaderMap([(":status", "200"), ("content-type", "application/json")])
    gc.disable()
    try:
        started = time.perf_counter()
        for _ in range(requests):
            stream = plugin.new_stream(info, callbacks)
            stream.request_headers(template.copy(), True)
            stream.response_headers(response.copy(), True)
            stream.complete()
        return (time.perf_counter() - started) / requests * 1e6
    finally:
        gc.enable()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        cold_runtime = abi.Runtime(cache_dir=cache)
        t = time.perf_counter()
        compiled = cold_runtime.compile(COUNTER)
        cold_ms = (time.perf_counter() - t) * 1e3
        cached_ms_all = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            again = abi.Runtime(cache_dir=cache).compile(COUNTER)
            cached_ms_all.append((time.perf_counter() - t) * 1e3)
            assert again.from_cache
        cached_ms = statistics.median(cached_ms_all)

    runtime = abi.Runtime()
    spec = abi.PluginSpec(name="counter", module_path=COUNTER, configuration=b"{}", vm_id="bench")
    plugin = runtime.load(spec, _NullHost(), module=runtime.compile(COUNTER))
    one_round(plugin, 200)  # warm-up
    per_request = [one_round(plugin, args.requests) for _ in range(args.rounds)]
    median = statistics.median(per_request)
    assert runtime.shared_data.get("bench", b"hits") is not None

    print(f"component: {COUNTER.relative_to(ROOT)} ({compiled.size} bytes)")
    print(f"compile cold:              {cold_ms:8.1f} ms")
    print(f"compile from disk cache:   {cached_ms:8.2f} ms   "
          f"(median of {args.rounds}; target <= {TARGET_CACHED_COMPILE_MS:g})")
    print(f"request (10 headers, log, shared get+set, 2 hooks): {median:6.1f} us   "
          f"(median of {args.rounds} x {args.requests}; min {min(per_request):.1f}, max {max(per_request):.1f}; "
          f"target <= {TARGET_REQUEST_US:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
