"""Where one proxy-wasm stream lifecycle's microseconds go: each primitive of the host timed
alone (CPU time, best of 5), then multiplied by how often one lifecycle of the lean filter
(bench/headers_filter.wat) uses it.

Usage:  python bench/breakdown_abi.py [--n 100000]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import wasmtime

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_abi import _Callbacks, _NullHost  # noqa: E402

from sluice import abi  # noqa: E402

# A module whose exports each do one thing many times: a loop of k calls to a trivial host function.
PROBE = """
(module
  (import "env" "proxy_clear_route_cache" (func $nop (result i32)))
  (import "env" "pthread_equal" (func $eq (param i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 0) ":path")
  (data (i32.const 64) "x-seen")
  (data (i32.const 80) "yes")
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32) (local $p i32)
    (if (i32.gt_u (i32.add (global.get $heap) (local.get $size)) (i32.const 65536))
      (then (global.set $heap (i32.const 4096))))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $p))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_tick") (param $k i32)
    (loop $l (if (local.get $k)
      (then (drop (call $nop)) (local.set $k (i32.sub (local.get $k) (i32.const 1))) (br $l)))))
  (func (export "proxy_on_queue_ready") (param $k i32) (param i32)
    (loop $l (if (local.get $k)
      (then (drop (call $eq (i32.const 1) (i32.const 2)))
      (local.set $k (i32.sub (local.get $k) (i32.const 1))) (br $l)))))
  (func (export "proxy_on_foreign_function") (param $k i32) (param i32) (param i32)
    (loop $l (if (local.get $k)
      (then (drop (call $get (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 128) (i32.const 132)))
      (local.set $k (i32.sub (local.get $k) (i32.const 1))) (br $l)))))
  (func (export "proxy_on_request_headers") (param $k i32) (param i32 i32) (result i32)
    (loop $l (if (local.get $k)
      (then (drop (call $add (i32.const 0) (i32.const 64) (i32.const 6) (i32.const 80) (i32.const 3)))
      (local.set $k (i32.sub (local.get $k) (i32.const 1))) (br $l))))
    (i32.const 0))
)
"""


def best(fn: Callable[[], None], runs: int = 5) -> float:
    gc.collect()
    gc.disable()
    try:
        out = []
        for _ in range(runs):
            t0 = time.process_time()
            fn()
            out.append(time.process_time() - t0)
        return min(out)
    finally:
        gc.enable()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100000)
    n = parser.parse_args().n
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {0})
    work = Path(tempfile.mkdtemp())
    probe_path = work / "probe.wasm"
    probe_path.write_bytes(wasmtime.wat2wasm(PROBE))
    lean_path = work / "lean.wasm"
    lean_path.write_bytes(wasmtime.wat2wasm((ROOT / "bench/headers_filter.wat").read_text()))
    runtime = abi.Runtime()
    host = _NullHost()

    def load(path: Path) -> abi.Plugin:
        spec = abi.PluginSpec(name=path.stem, module_path=path, configuration=b"{}", log_level=abi.LogLevel.INFO)
        plugin = runtime.load(spec, host, module=runtime.compile(path))
        assert isinstance(plugin, abi.Plugin)
        return plugin

    probe = load(probe_path)
    vm = probe._vm
    assert vm is not None
    root = probe._root
    handle = vm.handle
    fns = vm.fn
    rows: list[tuple[str, float, float]] = []  # (what, ns each, times per lifecycle)

    def per(label: str, seconds: float, count: int, times: float) -> float:
        ns = seconds / count * 1e9
        rows.append((label, ns, times))
        return ns

    # A call into wasm (an export doing nothing: the tick loop with k = 0), raw and through vm.invoke.
    tick = fns["proxy_on_tick"]

    def raw_calls() -> None:
        for i in range(n):
            if i & 1023 == 0:
                handle.arm_deadline_ms(1000)
            tick(0)

    call_ns = best(raw_calls) / n * 1e9

    def arms() -> None:
        for _ in range(n):
            handle.arm_deadline()

    arm_ns = best(arms) / n * 1e9

    def invokes() -> None:
        args = (0,)
        for _ in range(n):
            vm.invoke(tick, root, args)

    invoke_ns = best(invokes) / n * 1e9
    per("call into wasm (fast-call layer, nothing exported runs)", call_ns * 1e-9 * n, n, 6)
    per("  + vm.invoke around it (frame, ACTIVE, gc, deadline)", (invoke_ns - call_ns) * 1e-9 * n, n, 6)
    rows.append(("    of which arming the epoch deadline", arm_ns, 6))

    # Host calls: the loop exports with k calls each, minus the same call with k = 0.
    k = 1000
    m = max(10, n // k)

    def host_loop(fn: object, *rest: int) -> float:
        def run() -> None:
            for _ in range(m):
                handle.arm_deadline_ms(1000)
                fn(k, *rest)  # type: ignore[operator]

        return best(run) / (m * k) * 1e9

    frame_ctx = root

    def with_frame(measure: Callable[[], float]) -> float:
        frame = vm._outer_frame
        frame.context = frame_ctx
        vm.frames.append(frame)
        abi_active = sys.modules["sluice.abi.fastcall"].ACTIVE
        abi_active.append(vm)
        try:
            return measure()
        finally:
            abi_active.pop()
            vm.frames.pop()

    nop_ns = with_frame(lambda: host_loop(fns["proxy_on_tick"]))
    eq_ns = with_frame(lambda: host_loop(fns["proxy_on_queue_ready"], 0))
    rows.append(("host call, no arguments (trampoline + dispatch + trivial impl)", nop_ns, 0))
    rows.append(("host call, 2 i32 arguments (pthread_equal)", eq_ns, 0))

    # Header host calls need a stream context with maps: run them inside a real stream.
    info = abi.StreamInfo()
    callbacks = _Callbacks()
    request = [(":method", "GET"), (":path", "/api/items?id=7"), (":authority", "example.com"),
               (":scheme", "http"), ("user-agent", "bench/1.0"), ("accept", "*/*")]
    stream = probe.new_stream(info, callbacks)
    stream.request_headers(abi.HeaderMap(request), True)
    ctx = stream  # the stream is its own context
    frame_ctx = ctx
    get_ns = with_frame(lambda: host_loop(fns["proxy_on_foreign_function"], 0, 0))
    per("proxy_get_header_map_value (incl. malloc call back into wasm)", get_ns * 1e-9, 1, 4)

    def adds() -> float:
        # 20 adds per fresh map: far below the header limits, so none is refused.
        maps = ctx.maps
        fresh = [abi.HeaderMap(request) for _ in range(n // 20)]
        add = fns["proxy_on_request_headers"]
        t0 = time.process_time()
        for hmap in fresh:
            maps[0] = hmap
            handle.arm_deadline_ms(1000)
            add(20, 0, 0)
        return (time.process_time() - t0) / n * 1e9

    gc.disable()
    add_ns = min(with_frame(adds) for _ in range(3))
    gc.enable()
    per("proxy_add_header_map_value", add_ns * 1e-9, 1, 2)
    stream.complete()

    # Per-stream Python objects and bookkeeping: a module exporting nothing a stream calls.
    lean = load(lean_path)

    def lifecycles() -> None:
        for _ in range(n // 10):
            req = abi.HeaderMap(request)
            resp = abi.HeaderMap([(":status", "200")])
            s = lean.new_stream(info, callbacks)
            s.request_headers(req, True)
            s.response_headers(resp, True)
            s.complete()

    life_ns = best(lifecycles) / (n // 10) * 1e9

    def maps_only() -> None:
        for _ in range(n):
            abi.HeaderMap(request)
            abi.HeaderMap([(":status", "200")])

    maps_ns = best(maps_only) / n * 1e9

    print(f"sluice abi breakdown — wasmtime {metadata.version('wasmtime')} — n={n}")
    print(f"\n{'primitive':66s} {'ns each':>8s} {'x/life':>7s} {'us/life':>8s}")
    accounted = 0.0
    for label, ns, times in rows:
        us = ns * times / 1000
        if not label.startswith("    ") and times:
            accounted += us
        print(f"{label:66s} {ns:8.0f} {times:7g} {us:8.2f}")
    print(f"\nlean filter, full lifecycle (measured):            {life_ns / 1000:8.2f} us")
    print(f"  of which building the two header maps:           {maps_ns / 1000:8.2f} us")
    print(f"  wasm calls + host calls (sum of the rows above): {accounted:8.2f} us")
    print(f"  the rest (stream objects, context, status, complete, histogram): "
          f"{(life_ns - maps_ns) / 1000 - accounted:8.2f} us")
    probe.retire()
    lean.retire()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
