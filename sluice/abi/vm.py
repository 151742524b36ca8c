"""One wasm instance of a proxy-wasm module (`WasmVM`: store, memory, exports, call frames) and
its contexts (`RootContext`, `StreamContext`), which own what each ABI call means; the host
functions (`hostcalls`, `wasi`) only unpack arguments and ask them.

A VM is driven by `Plugin` (root context, failure policy) and `HttpStream` (stream callbacks),
which it knows only through the `VMOwner` and `StreamActions` protocols, so it imports neither.
Rules from cpp-host that this module enforces (reference 1.0, 2.1, 2.4):

* Every call into wasm runs under a frame naming the context whose callback runs; the effective
  context set by `proxy_set_effective_context` lasts until that callback returns.
* Side effects that re-enter the proxy (continue, local reply, reset, deferred deletes) are queued
  and run after the *outermost* callback returns, never from inside wasm.
* Every call into wasm is armed with the plugin's CPU deadline (epoch interruption).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import wasmtime

from . import fastcall
from .api import CallResponse, Cancellable, Host, LocalReply, PluginSpec, RedisHost, StreamInfo
from .compiled import CompiledModule
from .fastcall import ACTIVE as _ACTIVE
from .fastcall import Frame, LinearMemory, StoreHandle, WasmFunction, WasmTrap, summarize_error
from .headers import HeaderMap, deserialize_pairs, utf8_len
from .metrics import MetricRegistry
from .properties import encode, lookup
from .shared import Queues, SharedData
from .types import BufferType, LogLevel, MapType, StreamType, WasmResult

# Callbacks sluice calls, with the wasm signature each must have (params, results). An export with
# another signature is treated as absent, like cpp-host's wasmtime runtime does. Header callbacks
# are checked separately: 0.1.0 modules export them with 2 parameters.
CALLBACKS: dict[str, tuple[str, str]] = {
    "proxy_on_context_create": ("ii", ""),
    "proxy_on_vm_start": ("ii", "i"),
    "proxy_on_configure": ("ii", "i"),
    "proxy_on_tick": ("i", ""),
    "proxy_on_queue_ready": ("ii", ""),
    "proxy_on_redis_call_response": ("iiii", ""),  # Higress ABI 0.2.100 (RootContext.redis_call)
    "proxy_on_foreign_function": ("iii", ""),
    "proxy_on_request_body": ("iii", "i"),
    "proxy_on_request_trailers": ("ii", "i"),
    "proxy_on_response_body": ("iii", "i"),
    "proxy_on_response_trailers": ("ii", "i"),
    "proxy_on_http_call_response": ("iiiii", ""),
    "proxy_on_done": ("i", "i"),
    "proxy_on_log": ("i", ""),
    "proxy_on_delete": ("i", ""),
    "_initialize": ("", ""),
    "_start": ("", ""),
    "main": ("ii", "i"),
    "__main_void": ("", "i"),
    "malloc": ("i", "i"),
    "proxy_on_memory_allocate": ("i", "i"),
}
HEADER_CALLBACKS = ("proxy_on_request_headers", "proxy_on_response_headers")
START_DEADLINE_MS = 1000.0
OK = WasmResult.OK
BAD_ARGUMENT = WasmResult.BAD_ARGUMENT
NOT_FOUND = WasmResult.NOT_FOUND
UNIMPLEMENTED = WasmResult.UNIMPLEMENTED
# Plain ints for the tests made on every host call (reading an IntEnum member costs far more).
_RESPONSE_BODY = int(BufferType.HTTP_RESPONSE_BODY)
_CALL_RESPONSE_BODY = int(BufferType.HTTP_CALL_RESPONSE_BODY)
_VM_CONFIGURATION = int(BufferType.VM_CONFIGURATION)
_PLUGIN_CONFIGURATION = int(BufferType.PLUGIN_CONFIGURATION)
_FOREIGN_FUNCTION_ARGUMENTS = int(BufferType.FOREIGN_FUNCTION_ARGUMENTS)
_REDIS_CALL_RESPONSE = int(BufferType.REDIS_CALL_RESPONSE)


@dataclasses.dataclass(eq=False)
class RootContext:
    id: int
    vm: WasmVM | None
    """The VM this root lives in; None once that VM is closed (the deleted root stays readable)."""
    tick_period_ms: int = 0
    tick_timer: Cancellable | None = None
    calls: dict[int, Cancellable | None] = dataclasses.field(default_factory=dict)
    """Outstanding HTTP callouts by token."""
    call_response: CallResponse | None = None
    """The callout response being delivered (maps 6/7, buffer 4), only during that callback."""
    status: tuple[int, bytes] = (0, b"")
    pending_done: bool = False
    deleted: bool = False
    queue_ready: Callable[[int], None] | None = None
    """Posts proxy_on_queue_ready for this root; bound to the queues it registered."""
    redis_clusters: set[str] = dataclasses.field(default_factory=set)
    """Clusters proxy_redis_init readied for this root (a replaced VM's root readies them again)."""
    redis_calls: set[int] = dataclasses.field(default_factory=set)
    """Outstanding Redis commands by token (tokens are shared with HTTP callouts)."""
    redis_reply: bytes | None = None
    """The Redis reply being delivered (buffer 9), only during proxy_on_redis_call_response."""

    @property
    def root(self) -> RootContext:
        return self

    def header_map(self, mtype: int, write: bool) -> HeaderMap | None:
        """A root sees only the callout response being delivered, read-only."""
        response = self.call_response
        if write or response is None:
            return None
        if mtype == MapType.HTTP_CALL_RESPONSE_HEADERS:
            return response.headers
        if mtype == MapType.HTTP_CALL_RESPONSE_TRAILERS:
            return response.trailers
        return None

    def get_header_value(self, mtype: int, key: str) -> str | None | WasmResult:
        """The value of `key` in map `mtype`; None when the map lacks it."""
        hmap = self.header_map(mtype, False)
        return BAD_ARGUMENT if hmap is None else hmap.get(key)

    def body(self, btype: int) -> bytes | bytearray | None:
        """Buffer `btype` as this context sees it (None: no such buffer here)."""
        if btype <= _RESPONSE_BODY:  # the request and response bodies (0, 1)
            return b""
        if btype == _CALL_RESPONSE_BODY and self.call_response is not None:
            return self.call_response.body
        if btype == _REDIS_CALL_RESPONSE:
            return self.redis_reply
        return None

    def set_body(self, btype: int, start: int, size: int, data: bytes) -> WasmResult:
        return NOT_FOUND  # a root context has no HTTP bodies

    def stream_action(self, stype: int, close: bool) -> WasmResult:
        return BAD_ARGUMENT if stype > StreamType.UPSTREAM else NOT_FOUND

    def http_call(
        self, upstream: str, headers: HeaderMap, body: bytes, trailers: HeaderMap, timeout_ms: int
    ) -> int | WasmResult:
        """proxy_http_call: the callout's token, or why it was refused."""
        if not (headers.get(":method") and headers.get(":path") and headers.get(":authority")):
            return BAD_ARGUMENT
        if timeout_ms > 0x7FFFFFFF:
            return BAD_ARGUMENT  # a negative i32
        vm = self.vm
        if vm is None:
            return BAD_ARGUMENT
        allowed = vm.spec.capabilities.http_call
        if allowed is not None and upstream not in allowed:
            return vm.refuse("capability.http_call", BAD_ARGUMENT)
        if len(self.calls) >= vm.spec.limits.max_callouts:
            return vm.refuse("limit.max_callouts", BAD_ARGUMENT)
        token = vm.new_token()
        accepted = vm.owner.http_call(
            self, token, upstream, headers, body, trailers, timeout_ms / 1000 if timeout_ms else None
        )
        return token if accepted else BAD_ARGUMENT

    def redis_init(self, cluster: str, username: str, password: str, timeout_ms: int) -> WasmResult:
        """proxy_redis_init (Higress): ready `cluster` for this root's calls."""
        vm = self.vm
        if vm is None:
            return BAD_ARGUMENT
        redis = vm.owner.redis
        if redis is None:
            return UNIMPLEMENTED
        if not redis.redis_init(cluster, username, password, timeout_ms / 1000 if timeout_ms else None):
            return BAD_ARGUMENT  # not a Redis cluster of the config
        self.redis_clusters.add(cluster)
        return OK

    def redis_call(self, cluster: str, query: bytes) -> int | WasmResult:
        """proxy_redis_call (Higress): the command's token, or why it was refused."""
        vm = self.vm
        if vm is None:
            return BAD_ARGUMENT
        if vm.owner.redis is None:
            return UNIMPLEMENTED
        if cluster not in self.redis_clusters:
            return BAD_ARGUMENT  # Higress: a cluster must be initialised first
        token = vm.new_token()
        return token if vm.owner.redis_call(self, token, cluster, query) else BAD_ARGUMENT

    def done(self) -> WasmResult:
        """proxy_done: the module has finished what made its proxy_on_done answer "not yet"."""
        vm = self.vm
        if not self.pending_done or vm is None:
            return NOT_FOUND
        owner = vm.owner
        vm.deferred.append(lambda: owner.finish_root(self))
        return OK

    def send_local_response(self, reply: LocalReply) -> WasmResult:
        return NOT_FOUND


class StreamActions(Protocol):
    """What a stream context asks of the host's stream (`plugin.HttpStream`) once its callback
    has returned: the events the filter raised."""

    info: StreamInfo
    paused: bool

    def resume_request(self) -> None: ...

    def resume_response(self) -> None: ...

    def reply_locally(self, reply: LocalReply) -> None: ...

    def reset(self) -> None: ...

    def fail(self, reason: str | None) -> None: ...


class StreamContext(fastcall.StreamCore):
    """One HTTP stream as its filter sees it: the header maps and bodies of the phase in progress,
    and what each ABI call on them means (Envoy's rules live here, once; the header lookups every
    request makes, `header_map` and `get_header_value`, are compiled in `fastcall.StreamCore`
    with the fields). Only ever made as `plugin.HttpStream`, the stream that is its own context."""

    __slots__ = ()

    # The compiled fields, as this module uses them.
    root: RootContext
    stream: StreamActions
    maps: list[HeaderMap | None]
    bodies: list[bytearray | None]

    def body(self, btype: int) -> bytes | bytearray | None:
        if btype <= _RESPONSE_BODY:  # the request and response bodies (0, 1)
            body = self.bodies[btype]
            return b"" if body is None else body
        return self.root.body(btype)

    def set_body(self, btype: int, start: int, size: int, data: bytes) -> WasmResult:
        """proxy_set_buffer_bytes on a body: replace `size` bytes at `start` with `data`."""
        body = self.bodies[btype] if btype <= _RESPONSE_BODY else None
        if body is None:
            return NOT_FOUND
        # The general splice is a superset of Envoy's (prepend at 0,0; replace at 0,len; append).
        length_now = len(body)
        start = min(start, length_now)
        end = min(start + size, length_now)
        vm = self._live_vm()
        if length_now - (end - start) + len(data) > vm.spec.limits.max_body_bytes:
            return vm.refuse("limit.max_body_bytes", BAD_ARGUMENT)
        body[start:end] = data
        return OK

    def stream_action(self, stype: int, close: bool) -> WasmResult:
        """proxy_continue_stream / proxy_close_stream: run once the callback has returned."""
        if stype > StreamType.UPSTREAM:
            return BAD_ARGUMENT
        if stype == StreamType.UPSTREAM and not close:
            return UNIMPLEMENTED  # as Envoy
        if stype >= StreamType.DOWNSTREAM:
            return OK if close else UNIMPLEMENTED  # no TCP filters here
        stream = self.stream
        if close:
            action = stream.reset
        else:
            action = stream.resume_request if stype == StreamType.HTTP_REQUEST else stream.resume_response
        self._live_vm().deferred.append(action)
        return OK

    def send_local_response(self, reply: LocalReply) -> WasmResult:
        vm = self._live_vm()
        if not vm.spec.capabilities.local_reply:
            return vm.refuse("capability.local_reply", UNIMPLEMENTED)
        frame = vm.frames[-1]
        if frame.context is self:
            frame.local_reply_sent = True
        stream = self.stream
        vm.deferred.append(lambda: stream.reply_locally(reply))
        return OK

    def _live_vm(self) -> WasmVM:
        vm = self.root.vm
        assert vm is not None  # a context whose VM is closed runs no callbacks
        return vm


Context = RootContext | StreamContext


class VMOwner(Protocol):
    """What a VM needs from the plugin that owns it: services whose state outlives one VM."""

    spec: PluginSpec
    host: Host
    redis: RedisHost | None
    """`host` when it serves Higress's Redis calls, else None (they answer UNIMPLEMENTED)."""
    metrics: MetricRegistry

    def log_level(self) -> LogLevel: ...

    def set_tick_period(self, root: RootContext, period_ms: int) -> None: ...

    def http_call(
        self, root: RootContext, token: int, upstream: str, headers: HeaderMap, body: bytes,
        trailers: HeaderMap, timeout_s: float | None,
    ) -> bool: ...

    def redis_call(self, root: RootContext, token: int, cluster: str, query: bytes) -> bool:
        """Send the command; its answer reaches proxy_on_redis_call_response on `root`."""
        ...

    def register_queue(self, root: RootContext, name: bytes) -> int: ...

    def refused(self, what: str) -> None:
        """Count a call a capability or limit refused (`PluginCounters.refused`)."""
        ...

    def finish_root(self, root: RootContext) -> None: ...


HostBinder = Callable[["WasmVM"], tuple[list[Callable[..., Any]], Callable[[LinearMemory], None]]]
"""Builds one VM's host-function implementations (in the linker's order) and a setter for its memory."""


@dataclasses.dataclass(frozen=True, slots=True)
class VMServices:
    """What every VM of the process shares; made by `Runtime`, handed to each plugin and VM."""

    engine: wasmtime.Engine
    shared_data: SharedData
    queues: Queues
    bind_host_functions: HostBinder


class WasmVM(fastcall.VMCore):
    """A live instance. Not thread-safe: all calls happen on the proxy's thread.

    The state every callback and host call touches (frames, deferred actions, the deadline
    handle, the allocator...) lives in `fastcall.VMCore`'s C fields, where the compiled calls read it."""

    handle: StoreHandle
    nested_trap: WasmTrap | None
    allocator: WasmFunction | None

    # Slots, not a __dict__: on a subclass of a compiled type, attributes in a dict are read
    # by name on every access (the interpreter's attribute caches do not apply), slots are not.
    __slots__ = ("services", "module", "owner", "spec", "host", "metrics", "log_level", "abi_version",
                 "_next_token", "failed_fn", "host_impls", "store", "memory", "fn", "__weakref__")

    def __init__(self, services: VMServices, module: CompiledModule, owner: VMOwner) -> None:
        self.services = services
        self.module = module
        self.owner = owner
        self.spec = owner.spec
        self.max_headers = self.spec.limits.max_headers
        self.max_header_bytes = self.spec.limits.max_header_bytes
        self.host = owner.host
        self.metrics = owner.metrics
        self.log_level = owner.log_level
        self.abi_version = module.abi_version
        self.contexts = {}
        self._next_context = 0
        self._next_token = 0
        self.frames = [Frame(None)]
        """Callbacks in progress, innermost last, above a bottom frame that stands for "none"
        (no context acts there). Never empty, so the list keeps its storage: pushing the frame
        of an outermost callback allocates nothing."""
        self._outer_frame = Frame(None)
        self.deferred = []
        self.dead = None
        """Why the VM may not be entered any more (proc_exit), or None."""
        self.nested_trap = None
        self.failed_fn: WasmFunction | None = None
        self.host_impls, bind_memory = services.bind_host_functions(self)

        self.store = wasmtime.Store(services.engine)
        self.store.set_limits(memory_size=self.spec.memory_limit)
        self.handle = StoreHandle(self.store, self.spec.cpu_deadline_ms)
        self.frames.append(Frame(None))
        _ACTIVE.append(self)
        try:
            # Start-up code (language runtimes' initialisers) gets a longer, fixed budget.
            self.handle.arm_deadline_ms(START_DEADLINE_MS)
            try:
                instance = module.instance_pre.instantiate(self.store)
            except wasmtime.WasmtimeError as exc:
                raise WasmTrap(summarize_error(str(exc))) from None
            exports = instance.exports(self.store)
            memory = exports.get("memory") if "memory" in exports else None
            if not isinstance(memory, wasmtime.Memory):
                raise WasmTrap("module exports no memory named 'memory'")
            self.memory = LinearMemory(self.handle, memory)
            bind_memory(self.memory)
            self.fn: dict[str, WasmFunction] = {}
            for name, (params, results) in CALLBACKS.items():
                self._bind_export(exports, name, {(params, results)})
            for name in HEADER_CALLBACKS:
                self._bind_export(exports, name, {("iii", "i"), ("ii", "i")})
            self.allocator = self.fn.get("malloc") or self.fn.get("proxy_on_memory_allocate")
            self.on_context_create = self.fn.get("proxy_on_context_create")
            # Current Envoy order at the end of a stream: log, done, delete.
            self.end_of_stream = tuple(
                self.fn[n] for n in ("proxy_on_log", "proxy_on_done", "proxy_on_delete") if n in self.fn
            )
            # 0.1.0 header callbacks take 2 arguments, 0.2.x take 3; some binaries mix them, so
            # each callback is called with its own arity.
            request_cb = self.fn.get("proxy_on_request_headers")
            response_cb = self.fn.get("proxy_on_response_headers")
            self.request_headers_args3 = request_cb is None or len(request_cb.params) == 3
            self.response_headers_args3 = response_cb is None or len(response_cb.params) == 3
            # What every stream on this VM asks per request, answered once per VM.
            self.request_headers_fn = request_cb
            self.response_headers_fn = response_cb
            self.reads_request_body = "proxy_on_request_body" in self.fn
            self.reads_response_body = "proxy_on_response_body" in self.fn
            if self.allocator is None:
                raise WasmTrap("module exports no allocator (malloc or proxy_on_memory_allocate)")
            self._run_start()
        finally:
            _ACTIVE.pop()
            self.frames.pop()

    def _bind_export(self, exports: Any, name: str, accepted: set[tuple[str, str]]) -> None:
        if name not in exports:
            return
        item = exports[name]
        if not isinstance(item, wasmtime.Func):
            return
        try:
            sig = fastcall.export_signature(item.type(self.store))
        except ValueError:
            return
        if sig in accepted:
            self.fn[name] = WasmFunction(self.handle, name, item, *sig)

    def _run_start(self) -> None:
        # cpp-host: _initialize (+ main(0,0) or __main_void), else _start.
        if "_initialize" in self.fn:
            self.fn["_initialize"]()
            if "main" in self.fn:
                self.fn["main"](0, 0)
            elif "__main_void" in self.fn:
                self.fn["__main_void"]()
        elif "_start" in self.fn:
            self.fn["_start"]()

    # -- contexts -----------------------------------------------------------------------------
    def new_token(self) -> int:
        self._next_token += 1
        return self._next_token << 2  # HTTP-call ids: low 2 bits 0, like cpp-host

    def acting(self) -> Context | None:
        frame = self.frames[-1]
        ctx: Context | None = frame.effective or frame.context
        return ctx

    def acting_root(self) -> RootContext | None:
        ctx = self.acting()
        if isinstance(ctx, StreamContext):
            return ctx.root
        return ctx

    def acting_stream(self) -> StreamContext | None:
        ctx = self.acting()
        return ctx if isinstance(ctx, StreamContext) else None

    # -- calls into wasm ----------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.fn

    def call(self, name: str, context: Context | None, *args: int, configuring: bool = False,
             deadline_ms: float | None = None) -> Any:
        """Call a callback under a frame for `context`; run deferred actions afterwards.

        `deadline_ms` replaces the filter's CPU deadline for this call (start-up callbacks).
        Raises WasmTrap. Returns the callback's result, or None if the module does not export it.
        """
        fn = self.fn.get(name)
        if fn is None:
            return None
        return self.invoke(fn, context, args, configuring, deadline_ms)

    invoke = fastcall.invoke
    """invoke(fn, context, args, configuring=False, deadline_ms=None, timing=None): `call` for a
    function already looked up (the per-request path), compiled.

    Runs `fn` under a frame for `context` (the outermost frame is reused: it is left clean after
    every call); an outermost call arms the CPU deadline (or `deadline_ms`), makes this VM the one
    host calls dispatch to and holds the cycle collector until the callback returns; with
    `timing` (a `fastcall.CallbackTimes`) it records its duration there. A local reply sent during the
    call makes the result 1 ("stop"). Deferred actions run after an outermost call. Raises WasmTrap."""

    invoke_each = fastcall.invoke_each
    """invoke_each(fns, context, args): several void callbacks in a row for one context (end of
    stream: log, done, delete), compiled.

    Each gets a fresh effective context (and, outermost, its full deadline); raises WasmTrap
    naming nothing: the caller knows which function it was from `self.failed_fn`."""

    def _trapped(self, exc: WasmTrap) -> WasmTrap:
        nested, self.nested_trap = self.nested_trap, None
        if nested is not None:
            exc = nested  # the allocator trapped inside a host call: report the real cause
        if exc.exit_code is not None:
            self.dead = f"proc_exit({exc.exit_code})"
        self.deferred.clear()
        return exc

    def run_deferred(self) -> None:
        while self.deferred:
            actions, self.deferred = self.deferred, []
            for action in actions:
                action()

    def return_bytes(self, data: bytes, ptr_ptr: int, size_ptr: int) -> int:
        """The returned-buffer protocol (reference 4.2): allocate in the module, copy, report.

        The allocator runs nested inside the host call that needs the buffer, on its frame (the
        only host call allocators make in practice is proxy_log); its trap is kept as
        `nested_trap`, the cause the outer call reports rather than "host call failed"."""
        result: int = fastcall.return_bytes(self, self.memory, data, ptr_ptr, size_ptr)
        return result

    # -- capabilities and limits -----------------------------------------------------------------
    def refuse(self, what: str, status: WasmResult) -> WasmResult:
        """Answer a call a capability or limit refused, and count it; never a trap."""
        self.owner.refused(what)
        return status

    def refuse_header_limit(self, fit: int) -> WasmResult:
        """An add or replace of a header (compiled in `fastcall.HostCalls`) that the header-map
        limits refused (`fit`: `fastcall.HEADER_TOO_MANY` or `HEADER_TOO_LARGE`)."""
        what = "limit.max_headers" if fit == fastcall.HEADER_TOO_MANY else "limit.max_header_bytes"
        return self.refuse(what, BAD_ARGUMENT)

    def replace_headers(self, hmap: HeaderMap, data: bytes) -> WasmResult:
        """proxy_set_header_map_pairs: the whole map at once, or nothing when over a limit.

        The count is read before decoding: a map over the limit is refused and the old one kept,
        where a malformed buffer clears the map (cpp-host)."""
        limits = self.spec.limits
        if len(data) >= 4 and int.from_bytes(data[:4], "little") > limits.max_headers:
            return self.refuse("limit.max_headers", BAD_ARGUMENT)
        pairs = deserialize_pairs(data)
        if sum(utf8_len(k) + utf8_len(v) for k, v in pairs) > limits.max_header_bytes:
            return self.refuse("limit.max_header_bytes", BAD_ARGUMENT)
        hmap.replace_all(pairs)
        return OK

    def property(self, segments: list[str]) -> bytes | None:
        """proxy_get_property: the encoded value, or None (NOT_FOUND) when absent or not granted."""
        if not self.spec.capabilities.property_allowed(segments):
            self.owner.refused("capability.properties")
            return None  # a property the filter may not read is, to it, not there
        value = lookup(segments, self.spec, self.stream_info())
        return None if value is None else encode(value)

    def environment(self) -> dict[str, str]:
        """The WASI environment: the spec's variables, narrowed by the capability."""
        env = self.spec.environment
        allowed = self.spec.capabilities.environment
        if allowed is None:
            return dict(env)
        return {k: v for k, v in env.items() if k in allowed}

    def get_shared(self, key: bytes) -> tuple[bytes, int] | None:
        """proxy_get_shared_data: only the filter's own vm_id (the ABI names no other)."""
        return self.services.shared_data.get(self.spec.vm_id, key)

    def set_shared(self, key: bytes, value: bytes, cas: int) -> WasmResult:
        """proxy_set_shared_data, if writes are granted and the namespace stays within limits."""
        if not self.spec.capabilities.shared_data_write:
            return self.refuse("capability.shared_data_write", UNIMPLEMENTED)
        store = self.services.shared_data
        vm_id = self.spec.vm_id
        limits = self.spec.limits
        keys, size = store.usage(vm_id)
        current = store.get(vm_id, key)
        if current is None:
            if keys >= limits.max_shared_keys:
                return self.refuse("limit.max_shared_keys", BAD_ARGUMENT)
            grows = len(key) + len(value)
        else:
            grows = len(value) - len(current[0])
        if grows > 0 and size + grows > limits.max_shared_bytes:
            return self.refuse("limit.max_shared_bytes", BAD_ARGUMENT)
        return store.set(vm_id, key, value, cas)

    def delete_shared(self, key: bytes, cas: int) -> WasmResult:
        """sluice_shared_data_delete: a write, so it needs the same capability as set."""
        if not self.spec.capabilities.shared_data_write:
            return self.refuse("capability.shared_data_write", UNIMPLEMENTED)
        return self.services.shared_data.delete(self.spec.vm_id, key, cas)

    def register_queue(self, root: RootContext, name: bytes) -> int | WasmResult:
        """proxy_register_shared_queue, within the number of queues a vm_id may hold."""
        queues = self.services.queues
        vm_id = self.spec.vm_id
        if queues.resolve(vm_id, name) is None and queues.count(vm_id) >= self.spec.limits.max_queues:
            return self.refuse("limit.max_queues", BAD_ARGUMENT)
        return self.owner.register_queue(root, name)

    def resolve_queue(self, vm_id: str, name: bytes) -> int | None:
        """proxy_resolve_shared_queue: the filter's own vm_id, or one it is granted."""
        own = self.spec.vm_id
        vm_id = vm_id or own
        allowed = self.spec.capabilities.queue_vm_ids
        if vm_id != own and allowed is not None and vm_id not in allowed:
            self.owner.refused("capability.queue_vm_ids")
            return None  # NOT_FOUND: as if that vm_id had no such queue
        return self.services.queues.resolve(vm_id, name)

    def enqueue(self, token: int, data: bytes) -> WasmResult:
        """proxy_enqueue_shared_queue, refused once the queue holds `max_queue_depth` items."""
        queues = self.services.queues
        depth = queues.depth(token)
        if depth is not None and depth >= self.spec.limits.max_queue_depth:
            return self.refuse("limit.max_queue_depth", BAD_ARGUMENT)
        return queues.enqueue(token, data)

    def define_metric(self, mtype: int, name: str) -> int | WasmResult:
        """proxy_define_metric, within the number of metrics a filter may define; ids of
        re-definitions are kept up to 16 times that (SDKs may define on every request)."""
        metrics = self.metrics
        limit = self.spec.limits.max_metrics
        if metrics.count() >= limit and not metrics.defined(mtype, name):
            return self.refuse("limit.max_metrics", BAD_ARGUMENT)
        metric_id = metrics.define(mtype, name, keep_redefinitions=16 * limit)
        return BAD_ARGUMENT if metric_id is None else metric_id

    # -- logging ------------------------------------------------------------------------------
    def log(self, level: LogLevel, message: str) -> None:
        if level >= self.log_level():
            self.host.log(self.spec.name, level, message)

    def stream_info(self) -> StreamInfo | None:
        stream = self.acting_stream()
        return stream.stream.info if stream is not None else None

    def buffer(self, btype: int) -> bytes | bytearray | None:
        """Buffer `btype` as the running callback sees it (None: not available here)."""
        if btype <= _RESPONSE_BODY or btype in (_CALL_RESPONSE_BODY, _REDIS_CALL_RESPONSE):
            ctx = self.acting()
            if ctx is None:
                return b"" if btype <= _RESPONSE_BODY else None
            return ctx.body(btype)
        if btype == _VM_CONFIGURATION:
            return self.spec.vm_configuration
        if btype == _PLUGIN_CONFIGURATION:
            # Envoy has no plugin-configuration buffer when the configuration is empty: the read
            # answers NOT_FOUND (the AssemblyScript SDK's default onConfigure then traps).
            return self.spec.configuration if self.frames[-1].configuring and self.spec.configuration else None
        if btype == _FOREIGN_FUNCTION_ARGUMENTS:
            return self.frames[-1].foreign_args
        return None  # downstream/upstream data and gRPC messages: no TCP or gRPC streams here

    def set_buffer(self, btype: int, start: int, size: int, data: bytes) -> WasmResult:
        """proxy_set_buffer_bytes: only the HTTP bodies are writable; the others are read-only."""
        if btype > _RESPONSE_BODY:
            return BAD_ARGUMENT if self.buffer(btype) is not None else NOT_FOUND
        ctx = self.acting()
        return ctx.set_body(btype, start, size, data) if ctx is not None else NOT_FOUND

    def configuration(self) -> bytes:
        """proxy_get_configuration: the plugin's configuration while configuring, else the VM's."""
        return self.spec.configuration if self.frames[-1].configuring else self.spec.vm_configuration

    def close(self) -> None:
        """Drop what ties this released VM to itself (host-call objects, contexts, exports), so
        refcounting frees its store and linear memory at once. Nothing may call into it after."""
        if self.dead is None:
            self.dead = "released"
        for ctx in self.contexts.values():
            if isinstance(ctx, StreamContext):
                ctx.stream = None  # type: ignore[assignment]
        self.contexts.clear()
        self.host_impls = []
        self.fn = {}
        self.end_of_stream = ()
        self.on_context_create = None
        self.request_headers_fn = self.response_headers_fn = None
        self.allocator = None
        self.deferred.clear()

    def memory_bytes(self) -> int:
        if self.dead is not None:
            return 0
        self.memory.refresh()  # the module may have grown its memory itself since we last looked
        return self.memory.size
