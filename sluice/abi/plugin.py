"""`Plugin` (one configured filter: its VMs, root context and failure policy) and `HttpStream`
(one request through that filter).

Failure policy. A trap, a CPU deadline or `proc_exit` inside a stream callback fails that stream
only: `fail_closed` answers it with a local 503, `fail_open` skips the filter for the rest of it.
The VM goes on serving other streams, unless it is dead (`proc_exit`) or the policy is `reload`;
then a fresh VM (new instance, new root context with create/vm_start/configure) serves new
streams, created no more often than an exponential backoff allows. Streams already running on the
old VM finish on it; a VM is released when its last stream completes.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from time import perf_counter
from typing import TYPE_CHECKING

from sluice.histogram import HistogramSnapshot

from .api import CallResponse, Host, LocalReply, PluginLoadError, PluginSpec, StreamCallbacks, StreamInfo
from .fastcall import WasmTrap
from .headers import HeaderMap
from .metrics import HISTOGRAM_BOUNDS, MetricRegistry
from .report import FilterMetric, ModuleInfo, PluginCounters, PluginReport, PluginState
from .types import FailurePolicy, FilterStatus, LogLevel, MetricType
from .vm import RootContext, StreamContext, WasmVM

if TYPE_CHECKING:
    from .runtime import CompiledModule, Runtime

CONTINUE = FilterStatus.CONTINUE
STOP = FilterStatus.STOP

CALLBACK_BOUNDS_S: tuple[float, ...] = (
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
)
MAX_BACKOFF_S = 60.0


@dataclasses.dataclass
class PluginStats:
    streams: int = 0
    callbacks: int = 0
    callback_seconds_sum: float = 0.0
    callback_buckets: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(CALLBACK_BOUNDS_S) + 1))
    """Counts per `CALLBACK_BOUNDS_S` upper bound (last = +Inf); not cumulative."""
    traps: int = 0
    deadlines: int = 0
    fail_closed: int = 0
    fail_open: int = 0
    reloads: int = 0
    reload_failures: int = 0

    pending: list[float] = dataclasses.field(default_factory=list)
    """Durations not yet bucketed: appending is cheaper than bucketing on the request path."""

    def observe(self, seconds: float) -> None:
        pending = self.pending
        pending.append(seconds)
        if len(pending) >= 512:
            self.flush()

    def flush(self) -> None:
        """Fold pending durations into the histogram (also called before reading it)."""
        pending, self.pending = self.pending, []
        buckets = self.callback_buckets
        for seconds in pending:
            buckets[bisect.bisect_left(CALLBACK_BOUNDS_S, seconds)] += 1
        self.callbacks += len(pending)
        self.callback_seconds_sum += sum(pending)


class Plugin:
    def __init__(self, runtime: Runtime, module: CompiledModule, spec: PluginSpec, host: Host) -> None:
        self.runtime = runtime
        self.module = module
        self.spec = spec
        self.host = host
        self.metric_registry = MetricRegistry()
        self.stats = PluginStats()
        self.log_level = spec.log_level
        self.vm: WasmVM | None = None
        self.root: RootContext | None = None
        self.last_error: str | None = None
        self.retired = False
        self._vms: dict[WasmVM, int] = {}
        """Live VMs and their active stream counts."""
        self._backoff = spec.reload_backoff_s
        self._next_reload = 0.0
        self._replace_pending = False

    # -- VMOwner -------------------------------------------------------------------------------
    def get_log_level(self) -> LogLevel:
        return self.log_level

    def set_log_level(self, level: LogLevel) -> None:
        self.log_level = level

    def set_tick_period(self, root: RootContext, period_ms: int) -> None:
        if root.tick_timer is not None:
            root.tick_timer.cancel()
            root.tick_timer = None
        root.tick_period_ms = period_ms
        # A retired plugin (replaced by a hot reload) does not tick again, even if a stream still
        # running on its VM asks for it.
        if period_ms > 0 and not root.deleted and not self.retired:
            root.tick_timer = self.host.call_later(period_ms / 1000, lambda: self._tick(root))

    def _tick(self, root: RootContext) -> None:
        root.tick_timer = None
        vm: WasmVM = root.vm
        if root.deleted or vm.dead is not None:
            return
        try:
            vm.call("proxy_on_tick", root, root.id)
        except WasmTrap as exc:
            self._on_trap(vm, exc, "proxy_on_tick")
        # Re-arm after the callback returns: ticks never overlap.
        if root.tick_period_ms > 0 and root.tick_timer is None and not root.deleted:
            root.tick_timer = self.host.call_later(root.tick_period_ms / 1000, lambda: self._tick(root))

    def http_call(
        self, root: RootContext, token: int, upstream: str, headers: HeaderMap, body: bytes,
        trailers: HeaderMap, timeout_s: float | None,
    ) -> bool:
        root.calls[token] = None
        accepted = self.host.http_call(
            upstream, headers, body, trailers, timeout_s,
            lambda response: self._on_call_response(root, token, response),
        )
        if not accepted:
            root.calls.pop(token, None)
        return accepted

    def _on_call_response(self, root: RootContext, token: int, response: CallResponse | None) -> None:
        if token not in root.calls:
            return
        del root.calls[token]
        vm: WasmVM = root.vm
        if root.deleted or vm.dead is not None or not vm.has("proxy_on_http_call_response"):
            return
        root.call_response = response
        if response is None:
            root.status = (11, b"reset")
            counts = (0, 0, 0)
        else:
            root.status = (0, b"")
            counts = (len(response.headers), len(response.body), len(response.trailers))
        try:
            vm.call("proxy_on_http_call_response", root, root.id, token, *counts)
        except WasmTrap as exc:
            self._on_trap(vm, exc, "proxy_on_http_call_response")
            self._fail_paused_streams(vm)
        finally:
            root.call_response = None
            root.status = (0, b"")

    def register_queue(self, root: RootContext, name: bytes) -> int:
        ready = root.queue_ready
        if ready is None:

            def ready(token: int) -> None:
                # Posted, never run inside the enqueuer's callback (cpp-host posts it too).
                self.host.call_later(0, lambda: self._queue_ready(root, token))

            root.queue_ready = ready
        return self.runtime.queues.register(self.spec.vm_id, name, ready)

    def _queue_ready(self, root: RootContext, token: int) -> None:
        vm: WasmVM = root.vm
        if root.deleted or vm.dead is not None:
            return
        try:
            vm.call("proxy_on_queue_ready", root, root.id, token)
        except WasmTrap as exc:
            self._on_trap(vm, exc, "proxy_on_queue_ready")

    def finish_root(self, root: RootContext) -> None:
        vm: WasmVM = root.vm
        if root.deleted:
            return
        root.deleted = True
        if vm.dead is None:
            try:
                vm.call("proxy_on_delete", root, root.id)
            except WasmTrap as exc:
                self._on_trap(vm, exc, "proxy_on_delete")
        vm.contexts.pop(root.id, None)
        if vm not in self._vms:
            self._close_if_finished(vm)  # the last root of a released VM called proxy_done

    # -- start-up --------------------------------------------------------------------------------
    def start(self) -> None:
        """Create the first VM and root context. Raises PluginLoadError."""
        self.vm, self.root = self._create_vm()
        self._vms[self.vm] = 0

    def _create_vm(self) -> tuple[WasmVM, RootContext]:
        path = self.spec.module_path
        try:
            vm = WasmVM(self.runtime, self.module, self)
        except WasmTrap as exc:
            raise PluginLoadError(path, f"instantiation failed: {exc}") from None
        root = RootContext(vm.new_context_id(), vm=vm)
        vm.contexts[root.id] = root
        step = "proxy_on_context_create"
        try:
            vm.call(step, root, root.id, 0)
            step = "proxy_on_vm_start"
            if vm.call(step, root, root.id, len(self.spec.vm_configuration)) == 0:
                raise PluginLoadError(path, "proxy_on_vm_start returned false (the VM refused to start)")
            step = "proxy_on_configure"
            if vm.call(step, root, root.id, len(self.spec.configuration), configuring=True) == 0:
                raise PluginLoadError(
                    path, "proxy_on_configure returned false (the filter rejected its configuration)"
                )
        except WasmTrap as exc:
            self._discard(vm, root)
            raise PluginLoadError(path, f"trapped in {step}: {exc}") from None
        except PluginLoadError:
            self._discard(vm, root)
            raise
        return vm, root

    def _discard(self, vm: WasmVM, root: RootContext) -> None:
        if root.tick_timer is not None:
            root.tick_timer.cancel()
        root.deleted = True
        if root.queue_ready is not None:
            self.runtime.queues.unbind(root.queue_ready)

    # -- streams ---------------------------------------------------------------------------------
    def new_stream(self, info: StreamInfo, callbacks: StreamCallbacks) -> HttpStream:
        self.stats.streams += 1
        if self._replace_pending and time.monotonic() >= self._next_reload:
            self._replace_vm()
        vm = self.vm
        # A retired plugin's roots are done: a stream started now (a race with a hot swap) gets
        # the failure policy rather than callbacks into a deleted root.
        if vm is None or vm.dead is not None or self.retired:
            mode = BYPASS if self.spec.failure_policy is FailurePolicy.FAIL_OPEN else FAILED
            if mode is FAILED:
                self.stats.fail_closed += 1
            else:
                self.stats.fail_open += 1
            return HttpStream(self, None, info, callbacks, mode)
        self._vms[vm] = self._vms.get(vm, 0) + 1
        return HttpStream(self, vm, info, callbacks, WASM)

    def _stream_done(self, vm: WasmVM) -> None:
        count = self._vms.get(vm, 0) - 1
        self._vms[vm] = count
        if count <= 0 and (vm is not self.vm or self.retired):
            self._release(vm)

    def _release(self, vm: WasmVM) -> None:
        self._vms.pop(vm, None)
        for ctx in list(vm.contexts.values()):
            if isinstance(ctx, RootContext):
                self._close_root(vm, ctx)
        self._close_if_finished(vm)

    def _close_if_finished(self, vm: WasmVM) -> None:
        """Close a released VM once no root is left waiting for `proxy_done` in it, so its memory
        is freed now rather than at the cycle collector's next full pass."""
        if vm in self._vms or any(isinstance(c, RootContext) for c in vm.contexts.values()):
            return
        if vm is self.vm:  # retired: nothing will run on it again
            self.vm = None
        if self.root is not None and self.root.vm is vm:
            self.root.vm = None  # the (deleted) root stays readable; the VM goes
        vm.close()

    def _close_root(self, vm: WasmVM, root: RootContext) -> None:
        if root.tick_timer is not None:
            root.tick_timer.cancel()
            root.tick_timer = None
        root.tick_period_ms = 0
        if root.queue_ready is not None:
            self.runtime.queues.unbind(root.queue_ready)
        if root.deleted:
            return
        if vm.dead is not None:
            root.deleted = True
            vm.contexts.pop(root.id, None)
            return
        try:
            done = vm.call("proxy_on_done", root, root.id)
        except WasmTrap as exc:
            self._on_trap(vm, exc, "proxy_on_done")
            done = 1
        if done == 0:
            root.pending_done = True  # the module will call proxy_done when it has finished
        else:
            self.finish_root(root)

    def retire(self) -> None:
        """Stop ticks; release every VM once its last stream completes (hot reload, shutdown)."""
        self.retired = True
        for vm, count in list(self._vms.items()):
            for ctx in vm.contexts.values():
                if isinstance(ctx, RootContext) and ctx.tick_timer is not None:
                    ctx.tick_timer.cancel()
                    ctx.tick_timer = None
                    ctx.tick_period_ms = 0
            if count <= 0:
                self._release(vm)

    # -- failures ----------------------------------------------------------------------------------
    def _on_trap(self, vm: WasmVM, exc: WasmTrap, where: str) -> None:
        if exc.deadline:
            self.stats.deadlines += 1
            reason = f"exceeded its CPU deadline of {self.spec.cpu_deadline_ms:g} ms in {where}"
        else:
            self.stats.traps += 1
            reason = f"trapped in {where}: {exc}"
        self.last_error = reason
        self.host.log(self.spec.name, LogLevel.ERROR, f"filter {self.spec.name} {reason}")
        if vm.dead is not None:
            self._fail_paused_streams(vm)  # nothing will ever resume them
        if vm is self.vm and (vm.dead is not None or self.spec.failure_policy is FailurePolicy.RELOAD):
            self._replace_pending = True
            if time.monotonic() >= self._next_reload:
                self._replace_vm()

    def _replace_vm(self) -> None:
        now = time.monotonic()
        self._replace_pending = False
        self._next_reload = now + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        old = self.vm
        try:
            vm, root = self._create_vm()
        except PluginLoadError as exc:
            self.stats.reload_failures += 1
            self._replace_pending = True
            self.last_error = f"reload failed: {exc.reason}"
            self.host.log(self.spec.name, LogLevel.ERROR, f"filter {self.spec.name} {self.last_error}")
            return
        self.stats.reloads += 1
        self.vm, self.root = vm, root
        self._vms[vm] = 0
        if old is not None and self._vms.get(old, 0) <= 0:
            self._release(old)

    def _fail_paused_streams(self, vm: WasmVM) -> None:
        """A root callback trapped: streams waiting on it would hang, so fail them now."""
        for ctx in list(vm.contexts.values()):
            if isinstance(ctx, StreamContext) and ctx.stream.paused:
                ctx.stream.fail(None)  # keep last_error: it names the callback that failed

    # -- reporting ---------------------------------------------------------------------------------
    def report(self) -> PluginReport:
        """Everything the proxy may know about this filter, as frozen values read now."""
        stats = self.stats
        stats.flush()
        module = self.module
        metrics = tuple(
            FilterMetric(
                m.name, m.type, m.value,
                HistogramSnapshot(HISTOGRAM_BOUNDS, tuple(m.buckets), float(m.sum), m.value)
                if m.type is MetricType.HISTOGRAM else None,
            )
            for m in self.metric_registry.all()
        )
        return PluginReport(
            name=self.spec.name,
            state=PluginState(self.state),
            module=ModuleInfo(str(module.path), module.sha256, module.size, module.abi_version),
            counters=PluginCounters(
                streams=stats.streams, callbacks=stats.callbacks, traps=stats.traps, deadlines=stats.deadlines,
                fail_closed=stats.fail_closed, fail_open=stats.fail_open, reloads=stats.reloads,
                reload_failures=stats.reload_failures,
            ),
            callback_seconds=HistogramSnapshot(
                CALLBACK_BOUNDS_S, tuple(stats.callback_buckets), stats.callback_seconds_sum, stats.callbacks
            ),
            metrics=metrics,
            last_error=self.last_error,
            log_level=self.log_level,
            vm_count=self.vm_count,
            active_streams=self.active_streams,
            memory_bytes=self.memory_bytes(),
        )

    def metrics(self) -> dict[str, int]:
        return self.metric_registry.values()

    @property
    def vm_count(self) -> int:
        return len(self._vms)

    @property
    def active_streams(self) -> int:
        return sum(max(c, 0) for c in self._vms.values())

    def memory_bytes(self) -> int:
        return sum(vm.memory_bytes() for vm in self._vms)

    @property
    def state(self) -> str:
        if self.retired:
            return "retired"
        if self.vm is None or self.vm.dead is not None:
            return "failed"
        if self._replace_pending:
            return "reloading"
        return "ok"


WASM = "wasm"
FAILED = "failed"
BYPASS = "bypass"


class HttpStream:
    """One HTTP stream through one filter. Methods mirror Envoy's filter callbacks."""

    __slots__ = ("plugin", "vm", "info", "callbacks", "mode", "ctx", "maps", "bodies", "in_log",
                 "paused", "completed", "_request_args3", "_response_args3", "_stats")

    def __init__(
        self, plugin: Plugin, vm: WasmVM | None, info: StreamInfo, callbacks: StreamCallbacks, mode: str
    ) -> None:
        self.plugin = plugin
        self.vm = vm
        self.info = info
        self.callbacks = callbacks
        self.mode = mode
        self.ctx: StreamContext | None = None
        # Indexed by MapType 0..3 and BufferType 0..1: what the host functions read and write.
        self.maps: list[HeaderMap | None] = [None, None, None, None]
        self.bodies: list[bytearray | None] = [None, None]
        self.in_log = False
        self.paused = False
        self.completed = False
        self._request_args3 = vm is not None and vm.request_headers_args3
        self._response_args3 = vm is not None and vm.response_headers_args3
        self._stats = plugin.stats

    # -- calls -------------------------------------------------------------------------------------
    def _call(self, name: str, *args: int) -> int | None:
        """Call a stream callback; a failure applies the plugin's failure policy and returns None."""
        vm = self.vm
        assert vm is not None
        fn = vm.fn.get(name)
        if fn is None:
            return None  # not exported: the default, continue
        ctx = self.ctx
        if ctx is None:
            ctx = self._create_context()
            if ctx is None:
                return None
        started = perf_counter()
        try:
            result: int | None = vm.invoke(fn, ctx, (ctx.id, *args))
        except WasmTrap as exc:
            self.plugin._on_trap(vm, exc, name)
            self.fail(None)
            return None
        self._stats.observe(perf_counter() - started)
        return result

    def _create_context(self) -> StreamContext | None:
        vm = self.vm
        plugin = self.plugin
        assert vm is not None
        root = plugin.root if plugin.vm is vm else _root_of(vm)
        if root is None:
            self.fail("the filter has no root context")
            return None
        ctx = StreamContext(vm.new_context_id(), root, self)
        vm.contexts[ctx.id] = ctx
        self.ctx = ctx
        try:
            if vm.on_context_create is not None:
                vm.invoke(vm.on_context_create, ctx, (ctx.id, root.id))
        except WasmTrap as exc:
            plugin._on_trap(vm, exc, "proxy_on_context_create")
            self.fail(None)
            return None
        return ctx

    def fail(self, reason: str | None) -> None:
        """Apply the failure policy to this stream (after a trap, or when the VM is unusable)."""
        if self.mode != WASM or self.completed:
            return
        if reason is not None:
            self.plugin.last_error = reason
        stats = self.plugin.stats
        if self.plugin.spec.failure_policy is FailurePolicy.FAIL_OPEN:
            stats.fail_open += 1
            self.mode = BYPASS
            if self.paused:
                self.paused = False
                self.callbacks.continue_request()
        else:
            stats.fail_closed += 1
            self.mode = FAILED
            self.paused = False
            self.callbacks.send_local_reply(_failure_reply(self.plugin.spec.name))

    def _status(self, result: int | None, continue_values: tuple[int, ...]) -> FilterStatus:
        if self.mode == BYPASS:
            return CONTINUE
        if self.mode == FAILED or result is None:
            return STOP if self.mode == FAILED else CONTINUE
        if result in continue_values:
            return CONTINUE
        self.paused = True
        return STOP

    # -- request path --------------------------------------------------------------------------
    def request_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus:
        self.maps[0] = headers
        if self.mode != WASM:
            return self._entry_status()
        if self._request_args3:
            r = self._call("proxy_on_request_headers", len(headers), 1 if end_of_stream else 0)
        else:
            r = self._call("proxy_on_request_headers", len(headers))
        # 0 Continue, 2 ContinueAndEndStream; 1, 3, 4 and anything larger stop (cpp-host).
        return self._status(r, (0, 2))

    def request_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus:
        self.bodies[0] = body
        if self.mode != WASM:
            return self._entry_status()
        self.paused = False
        r = self._call("proxy_on_request_body", len(body), 1 if end_of_stream else 0)
        return self._status(r, (0,))

    def request_trailers(self, trailers: HeaderMap) -> FilterStatus:
        self.maps[1] = trailers
        if self.mode != WASM:
            return self._entry_status()
        r = self._call("proxy_on_request_trailers", len(trailers))
        return self._status(r, (0,))

    # -- response path -------------------------------------------------------------------------
    def response_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus:
        self.maps[2] = headers
        if self.mode != WASM:
            return CONTINUE  # a failed filter is skipped on the way back (Envoy)
        if self._response_args3:
            r = self._call("proxy_on_response_headers", len(headers), 1 if end_of_stream else 0)
        else:
            r = self._call("proxy_on_response_headers", len(headers))
        return self._status(r, (0, 2))

    def response_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus:
        self.bodies[1] = body
        if self.mode != WASM:
            return CONTINUE
        self.paused = False
        r = self._call("proxy_on_response_body", len(body), 1 if end_of_stream else 0)
        return self._status(r, (0,))

    def response_trailers(self, trailers: HeaderMap) -> FilterStatus:
        self.maps[3] = trailers
        if self.mode != WASM:
            return CONTINUE
        r = self._call("proxy_on_response_trailers", len(trailers))
        return self._status(r, (0,))

    def _entry_status(self) -> FilterStatus:
        if self.mode == BYPASS:
            return CONTINUE
        if not self.paused:
            # A failed-closed filter answers every request phase with its 503, once.
            self.paused = True
            self.callbacks.send_local_reply(_failure_reply(self.plugin.spec.name))
        return STOP

    # -- end of stream -------------------------------------------------------------------------
    def complete(self) -> None:
        """proxy_on_log, proxy_on_done, proxy_on_delete (current Envoy order); exactly once."""
        if self.completed:
            return
        self.completed = True
        vm = self.vm
        if vm is None:
            self._detach()
            return
        try:
            if self.mode == WASM and vm.dead is None:
                if self.ctx is None and self.maps[0] is not None:
                    self._create_context()  # Envoy: the access-log hook creates it if needed
                ctx = self.ctx
                if ctx is not None and self.mode == WASM:
                    self.in_log = True
                    try:
                        vm.invoke_each(vm.end_of_stream, ctx, (ctx.id,))
                    except WasmTrap as exc:
                        failed = vm.failed_fn
                        self.plugin._on_trap(vm, exc, failed.name if failed else "proxy_on_log")
            if self.ctx is not None:
                self.ctx.deleted = True
                vm.contexts.pop(self.ctx.id, None)
        finally:
            self.plugin._stream_done(vm)
            self._detach()

    def _detach(self) -> None:
        """Drop what ties a finished stream to its context and its chain.

        Without this every request leaves reference cycles (stream <-> context, stream <->
        the chain's callbacks) for the cycle collector, whose pauses show up as tail latency.
        Late events (a callout answer after the stream ended) see `completed` and stop there.
        """
        if self.ctx is not None:
            self.ctx.stream = None  # type: ignore[assignment]
            self.ctx = None
        self.maps = [None, None, None, None]
        self.bodies = [None, None]
        self.callbacks = _DETACHED

    # -- events raised by the filter (run after its callback returned) -------------------------
    def resume_request(self) -> None:
        if self.completed or self.mode != WASM:
            return
        self.paused = False
        self.callbacks.continue_request()

    def resume_response(self) -> None:
        if self.completed or self.mode != WASM:
            return
        self.paused = False
        self.callbacks.continue_response()

    def reply_locally(self, reply: LocalReply) -> None:
        if self.completed:
            return
        self.paused = False
        self.callbacks.send_local_reply(reply)

    def reset(self) -> None:
        if self.completed:
            return
        self.callbacks.reset()


class _Detached:
    """The callbacks of a completed stream: events after the end go nowhere."""

    def continue_request(self) -> None: ...
    def continue_response(self) -> None: ...
    def send_local_reply(self, reply: LocalReply) -> None: ...
    def reset(self) -> None: ...


_DETACHED = _Detached()


def _root_of(vm: WasmVM) -> RootContext | None:
    for ctx in vm.contexts.values():
        if isinstance(ctx, RootContext) and not ctx.deleted:
            return ctx
    return None


def _failure_reply(name: str) -> LocalReply:
    return LocalReply(503, f"filter {name} failed\n".encode(), details="wasm_fail_stream")
