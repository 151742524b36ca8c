"""`Plugin` (one configured filter: its VMs, root context and failure policy) and `HttpStream`
(one request through that filter).

Failure policy. A trap, a CPU deadline or `proc_exit` inside a stream callback fails that stream
only: `fail_closed` answers it with a local 503, `fail_open` skips the filter for the rest of it.
The VM goes on serving other streams, unless it is dead (`proc_exit`) or the policy is `reload`;
then a fresh VM (new instance, new root context with create/vm_start/configure) serves new
streams, built from a host timer (never on a request's path) no more often than an exponential
backoff allows. Until it is there, a live VM keeps serving and a dead one's streams get the
failure policy. Streams already running on the old VM finish on it; a VM is released when its
last stream completes.

The proxy reads a plugin only through `Plugin.report()`; the hooks its VMs call (ticks, callouts,
Redis commands, queues, proxy_done) go through `_VMHooks`, so they are not part of `Plugin`'s API.
"""

from __future__ import annotations

from .api import (
    CallResponse,
    Host,
    LocalReply,
    PluginLoadError,
    PluginSpec,
    RedisHost,
    StreamCallbacks,
    StreamInfo,
)
from .common import CALLBACK_BOUNDS_S, DETACHED, Counters, Replacement, StreamMode, build_report, failure_reply
from .compiled import CompiledModule
from .fastcall import CallbackTimes, LogThreshold, WasmTrap, set_stream_constants
from .headers import HeaderMap
from .metrics import MetricRegistry
from .report import ModuleInfo, PluginReport, PluginState
from .types import FailurePolicy, FilterStatus, LogLevel
from .vm import START_DEADLINE_MS, RootContext, StreamContext, VMServices, WasmVM

CONTINUE = FilterStatus.CONTINUE
STOP = FilterStatus.STOP

REDIS_CALLBACK = "proxy_on_redis_call_response"


class _VMHooks:
    """The plugin as its VMs see it (`vm.VMOwner`): the services whose state outlives one VM.

    A separate object so the VM-only hooks are not methods of `Plugin`'s public API."""

    __slots__ = ("_plugin", "spec", "host", "redis", "metrics", "log_level")

    def __init__(self, plugin: Plugin) -> None:
        self._plugin = plugin
        self.spec = plugin._spec
        self.host = plugin._host
        self.redis: RedisHost | None = plugin._host if isinstance(plugin._host, RedisHost) else None
        self.metrics = plugin._metrics
        self.log_level = plugin._log_threshold
        """The plugin's level, read by the compiled proxy_log without a call (`log_level()` for the rest)."""

    def set_tick_period(self, root: RootContext, period_ms: int) -> None:
        self._plugin._set_tick_period(root, period_ms)

    def http_call(
        self, root: RootContext, token: int, upstream: str, headers: HeaderMap, body: bytes,
        trailers: HeaderMap, timeout_s: float | None,
    ) -> bool:
        return self._plugin._http_call(root, token, upstream, headers, body, trailers, timeout_s)

    def redis_call(self, root: RootContext, token: int, cluster: str, query: bytes) -> bool:
        return self._plugin._redis_call(root, token, cluster, query)

    def register_queue(self, root: RootContext, name: bytes) -> int:
        return self._plugin._register_queue(root, name)

    def finish_root(self, root: RootContext) -> None:
        self._plugin._finish_root(root)

    def refused(self, what: str) -> None:
        refused = self._plugin._counters.refused
        refused[what] = refused.get(what, 0) + 1


class Plugin:
    """One configured filter. The proxy uses `new_stream`, `report`, `set_log_level`, `retire`."""

    def __init__(self, services: VMServices, module: CompiledModule, spec: PluginSpec, host: Host) -> None:
        self._services = services
        self._module = module
        self._spec = spec
        self._host = host
        self._metrics = MetricRegistry()
        self._counters = Counters()
        self._callback_time = CallbackTimes(CALLBACK_BOUNDS_S)
        """Where the compiled call layer buckets each stream callback's duration."""
        self._log_level = spec.log_level
        self._log_threshold = LogThreshold(spec.log_level)
        self._hooks = _VMHooks(self)
        self._vm: WasmVM | None = None
        self._root: RootContext | None = None
        self._last_error: str | None = None
        self._retired = False
        self._vms: set[WasmVM] = set()
        """Live VMs (each counts its own streams: `live_streams`)."""
        self._replacement = Replacement(host, spec.reload_backoff_s, self._replace_vm)

    @classmethod
    def start(cls, services: VMServices, module: CompiledModule, spec: PluginSpec, host: Host) -> Plugin:
        """A plugin with its first VM and root context. Raises PluginLoadError."""
        plugin = cls(services, module, spec, host)
        plugin._vm, plugin._root = plugin._create_vm()
        plugin._vms.add(plugin._vm)
        return plugin

    @property
    def name(self) -> str:
        return self._spec.name

    def set_log_level(self, level: LogLevel) -> None:
        self._log_level = level
        self._log_threshold.set(level)

    # -- what the VMs call (through _VMHooks) -------------------------------------------------------
    def _set_tick_period(self, root: RootContext, period_ms: int) -> None:
        if root.tick_timer is not None:
            root.tick_timer.cancel()
            root.tick_timer = None
        root.tick_period_ms = period_ms
        # A retired plugin (replaced by a hot reload) does not tick again, even if a stream still
        # running on its VM asks for it.
        if period_ms > 0 and not root.deleted and not self._retired:
            root.tick_timer = self._host.call_later(period_ms / 1000, lambda: self._tick(root))

    def _tick(self, root: RootContext) -> None:
        root.tick_timer = None
        vm = root.vm
        if root.deleted or vm is None or vm.dead is not None:
            return
        try:
            vm.call("proxy_on_tick", root, root.id)
        except WasmTrap as exc:
            self._on_trap(vm, exc, "proxy_on_tick")
        # Re-arm after the callback returns: ticks never overlap.
        if root.tick_period_ms > 0 and root.tick_timer is None and not root.deleted:
            root.tick_timer = self._host.call_later(root.tick_period_ms / 1000, lambda: self._tick(root))

    def _http_call(
        self, root: RootContext, token: int, upstream: str, headers: HeaderMap, body: bytes,
        trailers: HeaderMap, timeout_s: float | None,
    ) -> bool:
        root.calls[token] = None
        accepted = self._host.http_call(
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
        vm = root.vm
        if root.deleted or vm is None or vm.dead is not None or not vm.has("proxy_on_http_call_response"):
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

    def _redis_call(self, root: RootContext, token: int, cluster: str, query: bytes) -> bool:
        redis = self._hooks.redis
        if redis is None:
            return False
        root.redis_calls.add(token)
        accepted = redis.redis_call(
            cluster, query, lambda reply, status: self._on_redis_response(root, token, reply, status)
        )
        if not accepted:
            root.redis_calls.discard(token)
        return accepted

    def _on_redis_response(self, root: RootContext, token: int, reply: bytes | None, status: int) -> None:
        if token not in root.redis_calls:
            return
        root.redis_calls.discard(token)
        vm = root.vm
        if root.deleted or vm is None or vm.dead is not None or not vm.has(REDIS_CALLBACK):
            return
        root.redis_reply = reply
        try:
            vm.call(REDIS_CALLBACK, root, root.id, token, 0 if reply is not None else status, len(reply or b""))
        except WasmTrap as exc:
            # The same consequences as a trap in proxy_on_http_call_response.
            self._on_trap(vm, exc, REDIS_CALLBACK)
            self._fail_paused_streams(vm)
        finally:
            root.redis_reply = None

    def _register_queue(self, root: RootContext, name: bytes) -> int:
        ready = root.queue_ready
        if ready is None:

            def ready(token: int) -> None:
                # Posted, never run inside the enqueuer's callback (cpp-host posts it too).
                self._host.call_later(0, lambda: self._queue_ready(root, token))

            root.queue_ready = ready
        return self._services.queues.register(self._spec.vm_id, name, ready)

    def _queue_ready(self, root: RootContext, token: int) -> None:
        vm = root.vm
        if root.deleted or vm is None or vm.dead is not None:
            return
        try:
            vm.call("proxy_on_queue_ready", root, root.id, token)
        except WasmTrap as exc:
            self._on_trap(vm, exc, "proxy_on_queue_ready")

    def _finish_root(self, root: RootContext) -> None:
        vm = root.vm
        if root.deleted or vm is None:
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

    # -- VMs -------------------------------------------------------------------------------------
    def _create_vm(self) -> tuple[WasmVM, RootContext]:
        path = self._spec.module_path
        try:
            vm = WasmVM(self._services, self._module, self._hooks)
        except WasmTrap as exc:
            raise PluginLoadError(path, f"instantiation failed: {exc}") from None
        root = RootContext(vm.new_context_id(), vm)
        vm.contexts[root.id] = root
        step = "proxy_on_context_create"
        try:
            # Start-up callbacks run off the request path and may parse large configurations: they
            # get the start-up budget, not the per-request CPU deadline.
            vm.call(step, root, root.id, 0, deadline_ms=START_DEADLINE_MS)
            step = "proxy_on_vm_start"
            if vm.call(step, root, root.id, len(self._spec.vm_configuration), deadline_ms=START_DEADLINE_MS) == 0:
                raise PluginLoadError(path, "proxy_on_vm_start returned false (the VM refused to start)")
            step = "proxy_on_configure"
            if vm.call(
                step, root, root.id, len(self._spec.configuration), configuring=True, deadline_ms=START_DEADLINE_MS
            ) == 0:
                raise PluginLoadError(
                    path, "proxy_on_configure returned false (the filter rejected its configuration)"
                )
        except WasmTrap as exc:
            self._discard(root)
            raise PluginLoadError(path, f"trapped in {step}: {exc}") from None
        except PluginLoadError:
            self._discard(root)
            raise
        return vm, root

    def _discard(self, root: RootContext) -> None:
        if root.tick_timer is not None:
            root.tick_timer.cancel()
        root.deleted = True
        if root.queue_ready is not None:
            self._services.queues.unbind(root.queue_ready)

    # -- streams ---------------------------------------------------------------------------------
    def new_stream(self, info: StreamInfo, callbacks: StreamCallbacks) -> HttpStream:
        self._counters.streams += 1
        vm = self._vm
        # A retired plugin's roots are done: a stream started now (a race with a hot swap) gets
        # the failure policy rather than callbacks into a deleted root. So does every stream
        # while a dead VM waits for its replacement (scheduled, never built on this path).
        if vm is None or vm.dead is not None or self._retired:
            mode = _BYPASS if self._spec.failure_policy is FailurePolicy.FAIL_OPEN else _FAILED
            if mode is _FAILED:
                self._counters.fail_closed += 1
            else:
                self._counters.fail_open += 1
            return HttpStream(self, None, info, callbacks, mode)
        return HttpStream(self, vm, info, callbacks, _WASM)  # counted in `vm.live_streams`

    def _stream_done(self, vm: WasmVM) -> None:
        """The last stream of a VM marked `release_when_idle` completed (`StreamCore.complete`)."""
        if vm in self._vms:  # not released already
            self._release(vm)

    def _root_for(self, vm: WasmVM) -> RootContext | None:
        """The root context new stream contexts on `vm` belong to."""
        if vm is self._vm:
            return self._root
        for ctx in vm.contexts.values():
            if isinstance(ctx, RootContext) and not ctx.deleted:
                return ctx
        return None

    def _release(self, vm: WasmVM) -> None:
        self._vms.discard(vm)
        for ctx in list(vm.contexts.values()):
            if isinstance(ctx, RootContext):
                self._close_root(vm, ctx)
        self._close_if_finished(vm)

    def _close_if_finished(self, vm: WasmVM) -> None:
        """Close a released VM once no root is left waiting for `proxy_done` in it, so its memory
        is freed now rather than at the cycle collector's next full pass."""
        if vm in self._vms or any(isinstance(c, RootContext) for c in vm.contexts.values()):
            return
        if vm is self._vm:  # retired: nothing will run on it again
            self._vm = None
        if self._root is not None and self._root.vm is vm:
            self._root.vm = None  # the (deleted) root stays readable; the VM goes
        vm.close()

    def _close_root(self, vm: WasmVM, root: RootContext) -> None:
        if root.tick_timer is not None:
            root.tick_timer.cancel()
            root.tick_timer = None
        root.tick_period_ms = 0
        if root.queue_ready is not None:
            self._services.queues.unbind(root.queue_ready)
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
            self._finish_root(root)

    def retire(self) -> None:
        """Stop ticks; release every VM once its last stream completes (hot reload, shutdown)."""
        self._retired = True
        self._replacement.stop()
        for vm in list(self._vms):
            vm.release_when_idle = True
            for ctx in vm.contexts.values():
                if isinstance(ctx, RootContext) and ctx.tick_timer is not None:
                    ctx.tick_timer.cancel()
                    ctx.tick_timer = None
                    ctx.tick_period_ms = 0
            if vm.live_streams <= 0:
                self._release(vm)

    # -- failures ----------------------------------------------------------------------------------
    def _on_trap(self, vm: WasmVM, exc: WasmTrap, where: str) -> None:
        if exc.deadline:
            self._counters.deadlines += 1
            reason = f"exceeded its CPU deadline of {self._spec.cpu_deadline_ms:g} ms in {where}"
        else:
            self._counters.traps += 1
            reason = f"trapped in {where}: {exc}"
        self._last_error = reason
        self._host.log(self._spec.name, LogLevel.ERROR, f"filter {self._spec.name} {reason}")
        if vm.dead is not None:
            self._fail_paused_streams(vm)  # nothing will ever resume them
        if vm is self._vm and (vm.dead is not None or self._spec.failure_policy is FailurePolicy.RELOAD):
            self._replacement.schedule()

    def _replace_vm(self) -> bool:
        """Build the fresh VM (run by `Replacement`, from a timer); whether it succeeded."""
        old = self._vm
        try:
            vm, root = self._create_vm()
        except PluginLoadError as exc:
            self._counters.reload_failures += 1
            self._last_error = f"reload failed: {exc.reason}"
            self._host.log(self._spec.name, LogLevel.ERROR, f"filter {self._spec.name} {self._last_error}")
            return False
        self._counters.reloads += 1
        self._vm, self._root = vm, root
        self._vms.add(vm)
        if old is not None:
            old.release_when_idle = True
            if old in self._vms and old.live_streams <= 0:
                self._release(old)
        return True

    def _fail_paused_streams(self, vm: WasmVM) -> None:
        """A root callback trapped: streams waiting on it would hang, so fail them now."""
        for ctx in list(vm.contexts.values()):
            if isinstance(ctx, StreamContext) and ctx.stream.paused:
                ctx.stream.fail(None)  # keep last_error: it names the callback that failed

    # -- reporting ---------------------------------------------------------------------------------
    def report(self) -> PluginReport:
        """Everything the proxy may know about this filter, as frozen values read now."""
        module = self._module
        return build_report(
            self._spec.name, self._state(),
            ModuleInfo(
                str(module.path), module.sha256, module.size, module.abi_version, module.unknown_imports
            ),
            self._counters, self._callback_time, self._metrics.report(), self._last_error, self._log_level,
            vm_count=len(self._vms),
            active_streams=sum(max(vm.live_streams, 0) for vm in self._vms),
            memory_bytes=sum(vm.memory_bytes() for vm in self._vms),
        )

    def _state(self) -> PluginState:
        if self._retired:
            return PluginState.RETIRED
        if self._vm is None or self._vm.dead is not None:
            return PluginState.FAILED
        if self._replacement.pending:
            return PluginState.RELOADING
        return PluginState.OK


# Module-level aliases: on Python 3.11 reading a member off its enum class costs ~10 times a
# global lookup, and the stream methods test the mode several times per request.
_WASM = StreamMode.WASM
_FAILED = StreamMode.FAILED
_BYPASS = StreamMode.BYPASS
set_stream_constants(_WASM, CONTINUE, STOP, DETACHED)


class HttpStream(StreamContext):
    """One HTTP stream through one filter. Methods mirror Envoy's filter callbacks.

    It is also the filter's stream context (`vm.StreamContext`, what the ABI calls on the stream
    mean): one object per filter and request rather than two pointing at each other. The context
    comes to life in the VM (an id, a root, `proxy_on_context_create`) at the first callback.

    What every request of every filter runs is compiled with the fields (`fastcall.StreamCore`):
    `__init__(plugin, vm, info, callbacks, mode)`, the header callbacks, `_create_context` and
    `complete` (log, done, delete). They call back here only for what is rare: a trap
    (`_trapped`), the failure policy (`fail`), a status other than Continue (`_status`), a stream
    that is not running wasm (`_entry_status`)."""

    __slots__ = ()

    # -- calls -------------------------------------------------------------------------------------
    def _call(self, name: str, *args: int) -> int | None:
        """Call a stream callback; a failure applies the plugin's failure policy and returns None."""
        vm = self._vm
        assert vm is not None
        fn = vm.fn.get(name)
        if fn is None:
            return None  # not exported: the default, continue
        if not self.id and not self._create_context():
            return None
        try:
            # Timed and bucketed in C.
            result: int | None = vm.invoke(fn, self, (self.id, *args), False, None, self._timing)
        except WasmTrap as exc:
            self._trapped(fn.name, exc)
            return None
        return result

    def _trapped(self, where: str, exc: WasmTrap) -> None:
        """A callback of this stream (`where`) trapped: reported, and the plugin's failure policy
        applies."""
        vm = self._vm
        assert vm is not None
        self._plugin._on_trap(vm, exc, where)
        self.fail(None)

    def fail(self, reason: str | None) -> None:
        """Apply the failure policy to this stream (after a trap, or when the VM is unusable)."""
        if self._mode is not _WASM or self.completed:
            return
        plugin = self._plugin
        if reason is not None:
            plugin._last_error = reason
        counters = plugin._counters
        if plugin._spec.failure_policy is FailurePolicy.FAIL_OPEN:
            counters.fail_open += 1
            self._mode = _BYPASS
            if self.paused:
                self.paused = False
                self._callbacks.continue_request()
        else:
            counters.fail_closed += 1
            self._mode = _FAILED
            self.paused = False
            self._callbacks.send_local_reply(failure_reply(plugin._spec.name))

    def _status(self, result: int | None, continue_values: tuple[int, ...]) -> FilterStatus:
        if self._mode is _BYPASS:
            return CONTINUE
        if self._mode is _FAILED or result is None:
            return STOP if self._mode is _FAILED else CONTINUE
        if result in continue_values:
            return CONTINUE
        self.paused = True
        return STOP

    # -- request path (headers: compiled) ------------------------------------------------------
    def request_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus:
        self.bodies[0] = body
        if self._mode is not _WASM:
            return self._entry_status()
        self.paused = False
        r = self._call("proxy_on_request_body", len(body), 1 if end_of_stream else 0)
        return self._status(r, (0,))

    def request_trailers(self, trailers: HeaderMap) -> FilterStatus:
        self.maps[1] = trailers
        if self._mode is not _WASM:
            return self._entry_status()
        r = self._call("proxy_on_request_trailers", len(trailers))
        return self._status(r, (0,))

    # -- response path (headers: compiled) -----------------------------------------------------
    def response_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus:
        self.bodies[1] = body
        if self._mode is not _WASM:
            return CONTINUE
        self.paused = False
        r = self._call("proxy_on_response_body", len(body), 1 if end_of_stream else 0)
        return self._status(r, (0,))

    def response_trailers(self, trailers: HeaderMap) -> FilterStatus:
        self.maps[3] = trailers
        if self._mode is not _WASM:
            return CONTINUE
        r = self._call("proxy_on_response_trailers", len(trailers))
        return self._status(r, (0,))

    def _entry_status(self) -> FilterStatus:
        if self._mode is _BYPASS:
            return CONTINUE
        if not self.paused:
            # A failed-closed filter answers every request phase with its 503, once.
            self.paused = True
            self._callbacks.send_local_reply(failure_reply(self._plugin._spec.name))
        return STOP

    # -- end of stream: `complete()` is compiled (fastcall.StreamCore) --------------------------

    # -- events raised by the filter (run after its callback returned) -------------------------
    def resume_request(self) -> None:
        if self.completed or self._mode is not _WASM:
            return
        self.paused = False
        self._callbacks.continue_request()

    def resume_response(self) -> None:
        if self.completed or self._mode is not _WASM:
            return
        self.paused = False
        self._callbacks.continue_response()

    def reply_locally(self, reply: LocalReply) -> None:
        if self.completed:
            return
        self.paused = False
        self._callbacks.send_local_reply(reply)

    def reset(self) -> None:
        if self.completed:
            return
        self._callbacks.reset()
