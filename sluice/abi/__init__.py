"""sluice's proxy-wasm host on wasmtime.

Public API (the only names `proxy` and tests import)::

    runtime = Runtime(cache_dir=Path(".sluice-cache"))       # one per process
    module = runtime.compile(path)        # CompiledModule; safe to run in a worker thread
    plugin = runtime.load(spec, host, module=module)           # VM + root context, vm_start, configure
    stream = plugin.new_stream(StreamInfo(...), callbacks)     # one per HTTP request
    stream.request_headers(headers, end_of_stream) -> FilterStatus
    ...
    stream.complete()
    plugin.report()                       # PluginReport: state, counters, histograms, metrics (frozen)
    plugin.set_log_level(LogLevel.DEBUG)
    plugin.retire()                       # stop ticks; VM released when its last stream completes

`Plugin.report()` is how the proxy reads a plugin; everything else in a plugin (VMs, contexts,
wasmtime objects, the VM-only hooks) is private to `sluice.abi`.

`runtime.load` raises `PluginLoadError` (file + reason) when the module is not wasm, has no ABI
marker, fails to instantiate, or `proxy_on_vm_start` / `proxy_on_configure` reject it.
Nothing raised inside wasm ever escapes a stream method: traps, deadlines and `proc_exit` apply
the plugin's failure policy instead.
"""

from .api import (
    CallResponse,
    Cancellable,
    Capabilities,
    FilterLimits,
    Host,
    LocalReply,
    PluginLoadError,
    PluginSpec,
    StreamCallbacks,
    StreamInfo,
)
from .compiled import CompiledModule
from .headers import HeaderMap
from .plugin import HttpStream, Plugin
from .report import FilterMetric, ModuleInfo, PluginCounters, PluginReport, PluginState
from .runtime import Runtime
from .shared import InMemorySharedData, SharedData
from .types import FailurePolicy, FilterStatus, LogLevel, MetricType

__all__ = [
    "CallResponse",
    "Cancellable",
    "Capabilities",
    "CompiledModule",
    "FailurePolicy",
    "FilterLimits",
    "FilterMetric",
    "FilterStatus",
    "HeaderMap",
    "Host",
    "HttpStream",
    "InMemorySharedData",
    "LocalReply",
    "LogLevel",
    "MetricType",
    "ModuleInfo",
    "Plugin",
    "PluginCounters",
    "PluginLoadError",
    "PluginReport",
    "PluginSpec",
    "PluginState",
    "Runtime",
    "SharedData",
    "StreamCallbacks",
    "StreamInfo",
]
