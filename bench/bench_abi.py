"""Benchmark of the proxy-wasm host (issue: "≤ 20 µs per request per filter").

Measures, in one run on one core:
  * compile time per module, cold and from the on-disk cache;
  * instantiate time per VM (instance + root context create/vm_start/configure);
  * a headers-only filter's full stream lifecycle — create, request headers (4 header reads and
    1 write), response headers (1 add), log, done, delete — through sluice's fast-call layer, and
    the same host code driven through wasmtime-py's high-level API (`Func.__call__`,
    `Linker.define_func`) side by side.

  * CPU µs per request (process time, so other work on a shared machine counts less) for the
    filters bench/bench_proxy.py puts in the server: the no-op filter, the AssemblyScript headers
    filter, each built-in Zig filter with bench_proxy's configuration, and the three chained.

Usage:  python bench/bench_abi.py [--requests 20000] [--module tests/fixtures/as/build/headers.wasm]
                                  [--rows-only]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import wasmtime

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sluice import abi  # noqa: E402
from sluice.abi import fastcall  # noqa: E402
from sluice.abi import vm as vm_module  # noqa: E402
from sluice.abi.hostcalls import HOST_FUNCTIONS  # noqa: E402


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


# -- the same host driven through wasmtime-py's high-level API --------------------------------

class HighLevelFunction:
    """Drop-in for fastcall.WasmFunction that calls through `wasmtime.Func.__call__`."""

    def __init__(self, handle: fastcall.StoreHandle, name: str, func: wasmtime.Func, params: str,
                 results: str) -> None:
        self.name, self.params, self.results = name, params, results
        self._store = handle.store
        self._func = func

    def __call__(self, *args: int) -> Any:
        try:
            return self._func(self._store, *args)
        except wasmtime.Trap as exc:
            raise fastcall.WasmTrap(str(exc)) from None

    def call_in(self, deadline: fastcall.StoreHandle | None, instance: Any, args: tuple[int, ...],
                timing: list[float] | None = None) -> Any:
        """What `fastcall.WasmFunction.call_in` does, in Python."""
        if deadline is not None:
            deadline.arm_deadline()
        fastcall.ACTIVE.append(instance)
        started = time.perf_counter()
        try:
            result = self(*args)
        finally:
            fastcall.ACTIVE.pop()
        if timing is not None:
            timing.append(time.perf_counter() - started)
        return result


def high_level_runtime() -> abi.Runtime:
    """A Runtime whose host functions go through wasmtime-py's `Linker.define_func` instead."""
    runtime = abi.Runtime()
    runtime.linker = wasmtime.Linker(runtime.engine)
    kinds = {"i": wasmtime.ValType.i32(), "I": wasmtime.ValType.i32(), "q": wasmtime.ValType.i64(),
             "Q": wasmtime.ValType.i64(), "d": wasmtime.ValType.f64()}
    for index, fn in enumerate(HOST_FUNCTIONS):
        unsigned = [k == "I" for k in fn.params]

        def call(*args: Any, _i: int = index, _u: list[bool] = unsigned) -> Any:
            vals = [a & 0xFFFFFFFF if u else a for a, u in zip(args, _u, strict=True)]
            return fastcall.ACTIVE[-1].host_impls[_i](*vals)

        ty = wasmtime.FuncType([kinds[k] for k in fn.params], [kinds[k] for k in fn.results])
        runtime.linker.define_func(fn.module, fn.name, ty, call)
    return runtime


# -- measurements -----------------------------------------------------------------------------

def lifecycle(plugin: abi.Plugin | list[abi.Plugin], n: int, clock: Any = time.perf_counter) -> float:
    """Mean µs per request for the full stream lifecycle through one filter, or a chain of them."""
    chain = plugin if isinstance(plugin, list) else [plugin]
    callbacks = _Callbacks()
    info = abi.StreamInfo()
    base = [(":method", "GET"), (":path", "/api/items?id=7"), (":authority", "example.com"),
            (":scheme", "http"), ("user-agent", "bench/1.0"), ("accept", "*/*"), ("x-api-key", API_KEY)]
    resp = [(":status", "200"), ("content-type", "application/json"), ("content-length", "2")]
    gc.collect()
    gc.disable()
    try:
        started = clock()
        for _ in range(n):
            request = abi.HeaderMap(base)
            response = abi.HeaderMap(resp)
            streams = [p.new_stream(info, callbacks) for p in chain]
            for stream in streams:
                stream.request_headers(request, True)
            for stream in reversed(streams):
                stream.response_headers(response, True)
            for stream in streams:
                stream.complete()
        elapsed = clock() - started
    finally:
        gc.enable()
    return elapsed / n * 1e6


def best_of(runs: int, fn: Any) -> float:
    return min(fn() for _ in range(runs))


# The filters and configurations of bench/bench_proxy.py's "+noop", "+as" and "+3" rows.
API_KEY = "bench-key"
BUILTINS = {
    "auth": b'{"api_keys": ["%s"]}' % API_KEY.encode(),
    "ratelimit": b'{"requests_per_second": 1000000, "burst": 1000000}',
    "ab": b'{"variants": {"a": 50, "b": 50}}',
}


def server_rows(runtime: abi.Runtime, host: _NullHost, requests: int) -> None:
    """CPU µs per request, one stream lifecycle, for each filter bench_proxy runs in the server."""
    work = Path(tempfile.mkdtemp())
    noop = work / "noop.wasm"
    noop.write_bytes(wasmtime.wat2wasm((ROOT / "bench/noop_filter.wat").read_text()))
    rows: list[tuple[str, Path, bytes]] = [
        ("noop (bench/noop_filter.wat)", noop, b""),
        ("AssemblyScript headers.wasm", ROOT / "tests/fixtures/as/build/headers.wasm", b"{}"),
    ]
    rows += [(f"{name}.wasm", ROOT / "sluice/filters" / f"{name}.wasm", config) for name, config in BUILTINS.items()]
    print("\nCPU µs per request (process time, best of 3) for one stream lifecycle "
          "(create, request headers, response headers, log, done, delete):")
    plugins: dict[str, abi.Plugin] = {}
    for label, path, config in rows:
        spec = abi.PluginSpec(name=path.stem, module_path=path, configuration=config, log_level=abi.LogLevel.INFO)
        plugin = runtime.load(spec, host, module=runtime.compile(path))
        lifecycle(plugin, 1000)  # warm up
        plugins[path.stem] = plugin
        us = best_of(3, lambda p=plugin: lifecycle(p, requests, time.process_time))
        print(f"  {label:32s} {us:7.2f}")
    chain = [plugins[name] for name in BUILTINS]
    us = best_of(3, lambda: lifecycle(chain, requests // 2, time.process_time))
    print(f"  {'auth + ratelimit + ab':32s} {us:7.2f}  ({us / len(chain):.2f} per filter)")
    for plugin in plugins.values():
        plugin.retire()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--module", action="append", default=[],
                        help="a headers-only filter to measure (repeatable); default: the lean WAT "
                             "filter bench/headers_filter.wat and the AssemblyScript SDK one")
    parser.add_argument("--rows-only", action="store_true",
                        help="only the CPU µs rows of the filters bench_proxy runs in the server")
    args = parser.parse_args()
    if not args.module:
        lean = Path(tempfile.mkdtemp()) / "headers_filter.wasm"
        lean.write_bytes(wasmtime.wat2wasm((ROOT / "bench/headers_filter.wat").read_text()))
        args.module = [str(lean), str(ROOT / "tests/fixtures/as/build/headers.wasm")]
    try:
        os.sched_setaffinity(0, {0})
        pinned = "pinned to CPU 0"
    except (AttributeError, OSError):
        pinned = "not pinned"
    print(f"sluice abi benchmark — wasmtime {metadata.version('wasmtime')} — {pinned}")
    if args.rows_only:
        server_rows(abi.Runtime(), _NullHost(), args.requests)
        return 0

    # Compile: cold vs cache.
    modules = [Path(m) for m in args.module] + sorted((ROOT / "sluice/filters").glob("*.wasm"))
    with tempfile.TemporaryDirectory() as cache:
        print("\ncompile time per module (ms):")
        for path in modules:
            cold = abi.Runtime(cache_dir=cache)
            t0 = time.perf_counter()
            mod = cold.compile(path)
            cold_ms = (time.perf_counter() - t0) * 1000
            warm = abi.Runtime(cache_dir=cache)
            t0 = time.perf_counter()
            mod2 = warm.compile(path)
            warm_ms = (time.perf_counter() - t0) * 1000
            assert mod2.from_cache and not mod.from_cache
            print(f"  {path.name:28s} {mod.size / 1024:7.1f} KiB   cold {cold_ms:8.2f}   from cache {warm_ms:6.2f}")

    fast = abi.Runtime()
    host = _NullHost()
    for path in args.module:
        module = fast.compile(path)
        spec = abi.PluginSpec(name="bench", module_path=Path(path), configuration=b"{}",
                              log_level=abi.LogLevel.INFO)
        # Instantiate: VM + root context through configure.
        samples = []
        for _ in range(50):
            t0 = time.perf_counter()
            plugin = fast.load(spec, host, module=module)
            samples.append((time.perf_counter() - t0) * 1000)
            plugin.retire()
        plugin = fast.load(spec, host, module=module)
        lifecycle(plugin, 2000)  # warm up
        fast_us = best_of(3, lambda p=plugin: lifecycle(p, args.requests))
        chain = [plugin] + [fast.load(spec, host, module=module) for _ in range(2)]
        chain_us = best_of(3, lambda c=chain: lifecycle(c, args.requests // 2))
        marginal_us = (chain_us - fast_us) / 2
        for p in chain:
            p.retire()

        slow_rt = high_level_runtime()
        saved = vm_module.WasmFunction
        vm_module.WasmFunction = HighLevelFunction  # type: ignore[assignment,misc]
        try:
            slow_plugin = slow_rt.load(spec, host, module=slow_rt.compile(path))
            lifecycle(slow_plugin, 500)
            slow_us = best_of(3, lambda p=slow_plugin: lifecycle(p, max(2000, args.requests // 5)))
            slow_plugin.retire()
        finally:
            vm_module.WasmFunction = saved  # type: ignore[misc]

        print(f"\n{Path(path).name}: full stream lifecycle (create, request headers: 4 reads + 1 write,"
              f" response headers: 1 add, log, done, delete)")
        print(f"  instantiate per VM (instance + context_create/vm_start/configure): "
              f"median {statistics.median(samples):.2f} ms, min {min(samples):.2f} ms")
        print(f"  sluice fast-call layer : {fast_us:7.2f} µs/request with one filter "
              f"(incl. building the request's header maps)")
        print(f"                           {chain_us:7.2f} µs/request through 3 instances of it: "
              f"{marginal_us:.2f} µs per additional filter")
        print(f"  wasmtime-py high-level : {slow_us:7.2f} µs/request with one filter "
              f"({slow_us / fast_us:.1f}x slower)")
        print(f"  target ≤ 20 µs per request per filter: {'met' if marginal_us <= 20 else 'NOT met'}"
              f" ({marginal_us:.2f} µs per filter)")
    server_rows(fast, host, args.requests)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
