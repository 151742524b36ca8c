"""sluice's proxy-wasm host on wasmtime.

Public API (the only names `proxy` and tests import)::

    runtime = Runtime(cache_dir=Path(".sluice-cache"))       # one per process
    module = runtime.compile(path)        # CompiledFilter (module or component); safe in a worker thread
    plugin = runtime.load(spec, host, module=module)           # Filter: VM + root context, vm_start, configure
    stream = plugin.new_stream(StreamInfo(...), callbacks)     # one per HTTP request
    stream.request_headers(headers, end_of_stream) -> FilterStatus
    ...
    stream.complete()
    plugin.report()                       # PluginReport: state, counters, histograms, metrics (frozen)
    plugin.set_log_level(LogLevel.DEBUG)
    plugin.retire()                       # stop ticks; VM released when its last stream completes

A `Filter` is a proxy-wasm `Plugin` or a `ComponentPlugin` (a WASI 0.2 component, component.py);
both offer exactly the calls above. `report()` is how the proxy reads a filter; everything else in
one (VMs, instances, contexts, wasmtime objects, the VM-only hooks) is private to `sluice.abi`.

`runtime.load` raises `PluginLoadError` (file + reason) when the module is not wasm, has no ABI
marker, fails to instantiate, or `proxy_on_vm_start` / `proxy_on_configure` reject it.
Nothing raised inside wasm ever escapes a stream method: traps, deadlines and `proc_exit` apply
the plugin's failure policy instead.
"""

from .api import (
    REDIS_CALL_FAILED,
    REDIS_CALL_TIMEOUT,
    CallResponse,
    Cancellable,
    Capabilities,
    FilterLimits,
    Host,
    LocalReply,
    NodeInfo,
    PluginLoadError,
    PluginSpec,
    RedisHost,
    StreamCallbacks,
    StreamInfo,
)
from .compiled import CompiledComponent, CompiledFilter, CompiledModule
from .component import ComponentPlugin, ComponentStream
from .headers import HeaderMap
from .plugin import HttpStream, Plugin
from .report import FilterMetric, ModuleInfo, PluginCounters, PluginReport, PluginState
from .runtime import Filter, Runtime
from .shared import InMemorySharedData, Queues, SharedData
from .shared_lmdb import LmdbQueues, LmdbSharedData, LmdbStore
from .types import FailurePolicy, FilterStatus, LogLevel, MetricType

__all__ = [
    "CallResponse",
    "Cancellable",
    "Capabilities",
    "CompiledComponent",
    "CompiledFilter",
    "CompiledModule",
    "ComponentPlugin",
    "ComponentStream",
    "FailurePolicy",
    "Filter",
    "FilterLimits",
    "FilterMetric",
    "FilterStatus",
    "HeaderMap",
    "Host",
    "HttpStream",
    "InMemorySharedData",
    "LmdbQueues",
    "LmdbSharedData",
    "LmdbStore",
    "LocalReply",
    "LogLevel",
    "MetricType",
    "ModuleInfo",
    "NodeInfo",
    "Plugin",
    "PluginCounters",
    "PluginLoadError",
    "PluginReport",
    "PluginSpec",
    "PluginState",
    "Queues",
    "REDIS_CALL_FAILED",
    "REDIS_CALL_TIMEOUT",
    "RedisHost",
    "Runtime",
    "SharedData",
    "StreamCallbacks",
    "StreamInfo",
]
