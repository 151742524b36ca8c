"""Benchmark of component filters (issue 15): per-request cost and compile time.

Measures, in one run:
  * compile of tests/fixtures/components/build/counter.wasm, cold and from the on-disk cache;
  * one request through the counter component via `ComponentPlugin` — stream create,
    `on-request` with 10 headers (one log, one shared-data get and set, one header edit
    applied), `on-response` (one header added), complete — through the component half of the
    fast-call layer (sluice/abi/fastcall_component.py);
  * the same per-request loop through the componentize-py example (examples/component-python,
    built and cached by its build.py; skipped when componentize-py is not installed);
  * for scale, in the same run, a proxy-wasm filter doing the same work through the core-module
    fast-call layer (tests/fixtures/wat/shared_counter.wat: shared get+set, one header write).
  wasmtime-py's public component API is not measured: its values cannot express
  `result<option<entry>, error>` (see fastcall_component's docstring), so it cannot run this world.

Medians of --rounds rounds of --requests requests each (the machine may be shared: medians).

Usage:  python bench/bench_component.py [--requests 5000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import wasmtime

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_abi import _Callbacks, _NullHost  # noqa: E402  (the same stand-ins as the proxy-wasm bench)

from sluice import abi  # noqa: E402

COUNTER = ROOT / "tests" / "fixtures" / "components" / "build" / "counter.wasm"
PROXY_WASM_COUNTER = ROOT / "tests" / "fixtures" / "wat" / "shared_counter.wat"
PYTHON_BUILD = ROOT / "examples" / "component-python" / "build.py"
TARGET_REQUEST_US = 30.0
TARGET_PYTHON_US = 60.0
TARGET_CACHED_COMPILE_MS = 50.0


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


def load(path: Path, **spec: Any) -> Any:
    runtime = abi.Runtime()
    # A generous CPU deadline: on a loaded machine a 20 ms wall-clock deadline can trip, and a
    # failed filter's cheap failure path would then flatter the figures.
    spec.setdefault("cpu_deadline_ms", 1000.0)
    plugin = runtime.load(abi.PluginSpec(name=path.stem, module_path=path, vm_id="bench", **spec), _NullHost())
    one_round(plugin, 200)  # warm-up
    return plugin


def python_component() -> Path | None:
    import importlib.util

    if importlib.util.find_spec("componentize_py") is None:
        return None
    proc = subprocess.run([sys.executable, str(PYTHON_BUILD)], capture_output=True, text=True, check=True)
    return Path(proc.stdout.strip())


def line(label: str, values: list[float], requests: int, target: float | None = None) -> str:
    med = statistics.median(values)
    verdict = f"; target <= {target:g}: {'met' if med <= target else 'NOT met'}" if target else ""
    return (f"{label:<44} {med:7.1f} us/request (median of {len(values)} x {requests}; "
            f"min {min(values):.1f}, max {max(values):.1f}{verdict})")


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

    python_requests = max(args.requests // 5, 200)
    # Interleave the filters round by round, so load from other work hits them alike.
    with tempfile.TemporaryDirectory() as tmp:
        wasm = Path(tmp) / "shared_counter.wasm"
        wasm.write_bytes(wasmtime.wat2wasm(PROXY_WASM_COUNTER.read_text()))
        python = python_component()
        plugins = {"component": load(COUNTER, configuration=b"{}"), "proxy-wasm": load(wasm)}
        if python is not None:
            plugins["python"] = load(python, configuration=b"{}")
        results: dict[str, list[float]] = {"component": [], "proxy-wasm": [], "python": []}
        for _ in range(args.rounds):
            for name, plugin in plugins.items():
                results[name].append(one_round(plugin, args.requests if name != "python" else python_requests))

    for name, plugin in plugins.items():
        counters = plugin.report().counters
        if counters.traps or counters.deadlines or counters.fail_closed or counters.fail_open:
            print(f"WARNING: {name} failed during the run ({counters}): its figure is not valid")
    print(f"component: {COUNTER.relative_to(ROOT)} ({compiled.size} bytes)")
    print(f"compile cold:              {cold_ms:8.1f} ms")
    print(f"compile from disk cache:   {cached_ms:8.2f} ms   "
          f"(median of {args.rounds}; target <= {TARGET_CACHED_COMPILE_MS:g})")
    print("per request: stream create, request head (10 headers: shared get + set, one header edit),")
    print("             response head (2 headers, one header added), complete")
    print(line("WAT component (compiled guest)", results["component"], args.requests, TARGET_REQUEST_US))
    print(line("proxy-wasm WAT filter, same work (reference)", results["proxy-wasm"], args.requests))
    if results["python"]:
        print(line("componentize-py component", results["python"], python_requests, TARGET_PYTHON_US))
    else:
        print("componentize-py component: not measured (componentize-py not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
