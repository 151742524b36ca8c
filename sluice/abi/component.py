"""Filters that are WASI 0.2 components exporting the `sluice:filter@0.1.0` world
(sluice/config/wit/filter.wit), side by side with proxy-wasm modules in one chain.

`ComponentPlugin` presents the proxy the same interface as `Plugin` (`new_stream`, `retire`,
`report`, the counters the admin API reads), and `ComponentStream` the same as `HttpStream`, so the
chain drives both alike. What differs is the contract with the guest: typed hooks instead of
callbacks plus host calls.

* `configure(config)` once per instance; an error rejects the filter with the guest's message.
* `on-request(head)` / `on-response(head)` return an action: continue with header edits, a local
  reply, or (request only) a callout whose answer goes to `on-callout-response`.
* Imports: `wasi:logging/logging` (into the host log, with the filter's log level) and
  `sluice:filter/shared-data` (the Runtime's `shared_data`, namespaced by `vm_id`, so proxy-wasm
  filters and components share keys and CAS values).
* A component importing other WASI 0.2 interfaces gets wasmtime's WASI with nothing granted:
  clocks and random; stdout/stderr into the filter's log; the environment from the filter's
  `environment`; no preopened directories, no network.

Failures: a trap or CPU deadline fails the current stream by the failure policy. A component
instance may not be entered again after a trap, so it is replaced by a fresh one (new store,
`configure` again) for the next stream, no more often than the reload backoff allows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Protocol

import wasmtime
from wasmtime import component as wc

from . import diskcache
from . import fastcall_component as fc
from .api import CallResponse, Host, LocalReply, PluginLoadError, PluginSpec, StreamCallbacks, StreamInfo
from .fastcall import StoreHandle, WasmTrap, summarize_error
from .headers import HeaderMap
from .metrics import MetricRegistry
from .plugin import _DETACHED, CALLBACK_BOUNDS_S, MAX_BACKOFF_S, PluginStats, _failure_reply
from .report import ModuleInfo, PluginCounters, PluginReport, PluginState
from .types import FailurePolicy, FilterStatus, LogLevel, WasmResult

if TYPE_CHECKING:
    from .shared import SharedData

from sluice.histogram import HistogramSnapshot

WORLD = "sluice:filter/filter@0.1.0"
ABI_VERSION = "component sluice:filter@0.1.0"
LOGGING = "wasi:logging/logging@0.1.0-draft"
SHARED_DATA = "sluice:filter/shared-data@0.1.0"
TYPES = "sluice:filter/types@0.1.0"
"""Imported for its types only (the world `use`s them): an empty instance satisfies it."""
OUR_IMPORTS = (LOGGING, SHARED_DATA, TYPES)
EXPORTS = ("configure", "on-request", "on-response", "on-callout-response")
CONFIGURE_DEADLINE_MS = 1000.0
_LEVELS = {lvl.name.lower(): lvl for lvl in LogLevel}
_SHARED_ERRORS = {WasmResult.CAS_MISMATCH: "cas-mismatch", WasmResult.NOT_FOUND: "not-found"}

CONTINUE = FilterStatus.CONTINUE
STOP = FilterStatus.STOP


@dataclasses.dataclass(frozen=True)
class CompiledComponent:
    """A validated, compiled component (the counterpart of `CompiledModule`)."""

    path: Path
    sha256: str
    size: int
    abi_version: str
    component: wc.Component
    wasi: bool
    """Whether it imports WASI 0.2 interfaces (then it is linked with the restricted WASI)."""
    compile_seconds: float
    from_cache: bool


COMPONENT_VERSION = b"\x0d\x00\x01\x00"
"""Bytes 4..8 of a component binary: version 0x0d, layer 1 (a core module has 1, 0, 0, 0)."""


def is_component(wasm: bytes) -> bool:
    return wasm[:4] == b"\0asm" and wasm[4:8] == COMPONENT_VERSION


def compile_component(
    engine: wasmtime.Engine, path: Path, wasm: bytes, cache_dir: Path | None, cache_tag: str
) -> CompiledComponent:
    """Validate and compile a component, through the on-disk cache. Raises PluginLoadError."""
    digest = hashlib.sha256(wasm).hexdigest()
    started = perf_counter()
    cached = cache_dir / f"{digest}-{cache_tag}.component.cwasm" if cache_dir is not None else None
    component: wc.Component | None = None
    from_cache = False
    if cached is not None and cached.exists():
        try:
            component = wc.Component.deserialize_file(engine, str(cached))
            from_cache = True
        except wasmtime.WasmtimeError:
            cached.unlink(missing_ok=True)  # stale or corrupt: recompile below
    if component is None:
        try:
            component = wc.Component(engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise PluginLoadError(path, f"invalid component: {summarize_error(str(exc))}") from None
        if cached is not None:
            diskcache.store(cached, component.serialize())
    elapsed = perf_counter() - started
    wasi = inspect(path, engine, component)
    return CompiledComponent(path, digest, len(wasm), ABI_VERSION, component, wasi, elapsed, from_cache)


# -- the linker: host functions defined once, dispatching to the active instance ---------------

_ACTIVE: list[_Instance] = []
"""Instances currently executing wasm; host calls act for the top one."""


def _log(args: int, _results: int, _n: int) -> None:
    inst = _ACTIVE[-1]
    kind, size, name, _ = fc.read_val(args)
    level = _LEVELS.get(fc.read_name(size, name), LogLevel.INFO) if kind == fc.ENUM else LogLevel.INFO
    if level < inst.plugin.log_level:
        return  # below the filter's level: not even decoded
    inst.plugin.guest_log(level, fc.read_string(args + fc.VAL.size), fc.read_string(args + 2 * fc.VAL.size))


def _shared_get(args: int, results: int, _n: int) -> None:
    inst = _ACTIVE[-1]
    plugin = inst.plugin
    found = plugin.shared_data.get(plugin.spec.vm_id, fc.to_utf8(fc.read_string(args)))
    if found is None:
        inst.results.ok_none(results)
        return
    value, cas = found
    try:
        value.decode()
    except UnicodeDecodeError:
        inst.results.err_enum(results, "not-utf8")
        return
    inst.results.ok_entry(results, value, cas)


def _shared_set(args: int, results: int, _n: int) -> None:
    inst = _ACTIVE[-1]
    plugin = inst.plugin
    key = fc.to_utf8(fc.read_string(args))
    value = fc.to_utf8(fc.read_string(args + fc.VAL.size))
    cas = fc.read_val(args + 2 * fc.VAL.size)[1] & 0xFFFFFFFF
    _shared_answer(inst, results, plugin.shared_data.set(plugin.spec.vm_id, key, value, cas))


def _shared_delete(args: int, results: int, _n: int) -> None:
    inst = _ACTIVE[-1]
    plugin = inst.plugin
    key = fc.to_utf8(fc.read_string(args))
    cas = fc.read_val(args + fc.VAL.size)[1] & 0xFFFFFFFF
    _shared_answer(inst, results, plugin.shared_data.delete(plugin.spec.vm_id, key, cas))


def _shared_answer(inst: _Instance, results: int, status: WasmResult) -> None:
    if status is WasmResult.OK:
        inst.results.ok(results)
    else:
        inst.results.err_enum(results, _SHARED_ERRORS.get(status, "not-found"))


_LINKERS: dict[bool, wc.Linker] = {}


def _linker(engine: wasmtime.Engine, wasi: bool) -> wc.Linker:
    """The linker for components without (False) or with (True) WASI 0.2 imports."""
    linker = _LINKERS.get(wasi)
    if linker is None:
        if not _LINKERS:
            fc.keep_gil_if_ticking_natively()
        linker = wc.Linker(engine)
        if wasi:
            linker.add_wasip2()
        with linker.root() as root:
            with root.add_instance(TYPES):
                pass
            with root.add_instance(LOGGING) as logging:
                fc.define_func(logging, "log", _log, f"{LOGGING}#log")
            with root.add_instance(SHARED_DATA) as shared:
                fc.define_func(shared, "get", _shared_get, f"{SHARED_DATA}#get")
                fc.define_func(shared, "set", _shared_set, f"{SHARED_DATA}#set")
                fc.define_func(shared, "delete", _shared_delete, f"{SHARED_DATA}#delete")
        _LINKERS[wasi] = linker
    return linker


def inspect(path: Path, engine: wasmtime.Engine, component: wc.Component) -> bool:
    """Check the component's exports and imports against the world; whether it needs WASI.

    Raises PluginLoadError naming what is missing or unknown.
    """
    ty = component.type
    exports = set(ty.exports(engine))
    missing = [name for name in EXPORTS if name not in exports]
    if missing:
        raise PluginLoadError(
            path, f"a component, but not a {WORLD} filter: it does not export {', '.join(missing)}"
        )
    wasi = False
    for name in ty.imports(engine):
        if name in OUR_IMPORTS:
            continue
        if name.startswith("wasi:"):
            wasi = True
            continue
        raise PluginLoadError(path, f"imports {name}, which sluice does not provide")
    return wasi


# -- decoding actions ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Edits:
    remove: tuple[str, ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()

    def apply(self, headers: HeaderMap) -> None:
        for name in self.remove:
            headers.remove(name)
        for name, value in self.set:
            headers.set(name, value)
        for name, value in self.add:
            headers.add(name, value)


@dataclasses.dataclass(frozen=True, slots=True)
class Callout:
    cluster: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    timeout_ms: int


Action = Edits | LocalReply | Callout


_NO_EDITS = Edits()


def _decode_action(addr: int) -> Action:
    case, payload = fc.read_variant(addr)
    fields = fc.read_record(payload)
    if case == "continue":
        remove_at, set_at, add_at = fields
        remove = tuple(fc.read_string(a) for a in fc.read_list(remove_at)) if fc.list_size(remove_at) else ()
        set_ = tuple(fc.read_headers(set_at)) if fc.list_size(set_at) else ()
        add = tuple(fc.read_headers(add_at)) if fc.list_size(add_at) else ()
        return Edits(remove, set_, add) if remove or set_ or add else _NO_EDITS
    if case == "reply":
        status = fc.read_val(fields[0])[1] & 0xFFFF
        headers = tuple(fc.read_headers(fields[1]))
        return LocalReply(status, fc.read_bytes(fields[2]), headers, details="component_reply")
    if case == "callout":
        return Callout(
            fc.read_string(fields[0]), tuple(fc.read_headers(fields[1])), fc.read_bytes(fields[2]),
            fc.read_val(fields[3])[1] & 0xFFFFFFFF,
        )
    raise ValueError(f"unknown action {case!r}")


def _decode_configured(addr: int) -> str | None:
    ok, payload = fc.read_result(addr)
    return None if ok else (fc.read_string(payload) if payload else "")


# -- one instance --------------------------------------------------------------------------------


class _Instance:
    """One store with one instance of the component."""

    __slots__ = ("plugin", "store", "handle", "funcs", "args", "results", "dead", "streams", "output")

    def __init__(self, plugin: ComponentPlugin) -> None:
        self.plugin = plugin
        compiled = plugin.module
        engine = plugin.runtime.engine
        spec = plugin.spec
        self.store = wasmtime.Store(engine)
        self.store.set_limits(memory_size=spec.memory_limit)
        self.output: _GuestOutput | None = None
        if compiled.wasi:
            self.output = _GuestOutput()
            self.store.set_wasi(plugin.restricted_wasi(self.output))
        self.handle = StoreHandle(self.store, spec.cpu_deadline_ms)
        self.args = fc.ArgBuffer()
        self.results = fc.HostResult()
        self.dead: str | None = None
        self.streams = 0
        self.handle.arm_deadline_ms(CONFIGURE_DEADLINE_MS)
        try:
            instance = _linker(engine, compiled.wasi).instantiate(self.store, compiled.component)
        except wasmtime.WasmtimeError as exc:
            raise PluginLoadError(spec.module_path, f"instantiation failed: {summarize_error(str(exc))}") from None
        self.funcs: dict[str, fc.ComponentFunction] = {}
        for name in EXPORTS:
            func = instance.get_func(self.store, name)
            if func is None:
                raise PluginLoadError(spec.module_path, f"export {name} is not a function")
            self.funcs[name] = fc.ComponentFunction(self.handle, name, func, keep_gil=not compiled.wasi)

    def call(
        self, name: str, nargs: int, decode: Callable[[int], object], *, deadline_ms: float | None = None
    ) -> object:
        if deadline_ms is None:
            self.handle.arm_deadline()
        else:
            self.handle.arm_deadline_ms(deadline_ms)
        _ACTIVE.append(self)
        try:
            return self.funcs[name].call(self.args, nargs, decode)
        except WasmTrap as exc:
            self.dead = str(exc)
            raise
        finally:
            _ACTIVE.pop()
            if self.output is not None:
                self.output.drain(self.plugin.guest_log)

    def configure(self, config: str) -> str | None:
        args = self.args
        raw = fc.to_utf8(config)
        args.reset(len(raw) + 64)
        args.alloc(fc.VAL.size)
        args.string(0, raw)
        result = self.call("configure", 1, _decode_configured, deadline_ms=CONFIGURE_DEADLINE_MS)
        assert result is None or isinstance(result, str)
        return result

    def head_hook(self, name: str, headers: HeaderMap) -> Action:
        items = headers.items()
        args = self.args
        args.reset(fc.headers_size(items))
        args.alloc(fc.VAL.size)
        args.headers(0, items)
        return self.call(name, 1, _decode_action)  # type: ignore[return-value]

    def callout_response(self, response: CallResponse | None) -> Action:
        args = self.args
        if response is None:
            args.reset(64)
            args.alloc(fc.VAL.size)
            args.val(0, fc.OPTION, 0)
        else:
            status_text = response.headers.get(":status") or "0"
            status = int(status_text) if status_text.isdigit() else 0
            items = response.headers.items()
            args.reset(fc.headers_size(items) + fc.VAL.size * (len(response.body) + 8) + 256)
            args.alloc(fc.VAL.size)
            record = args.alloc(fc.VAL.size)
            args.val(0, fc.OPTION, args.base + record)
            status_at, headers_at, body_at = args.record(record, ("status", "headers", "body"))
            args.val(status_at, fc.U16, status)
            args.headers(headers_at, items)
            args.bytes_list(body_at, response.body)
        return self.call("on-callout-response", 1, _decode_action)  # type: ignore[return-value]


class _GuestOutput:
    """A WASI guest's stdout and stderr, written by wasmtime to two unlinked temporary files and
    read into the filter's log after every call.

    Not wasmtime-py's `stdout_custom` callbacks: wasmtime's WASI runs those on its own threads,
    which then need the GIL: a call keeping the GIL deadlocks, and one at interpreter exit
    aborts the process. Files involve no Python outside the calling thread.
    """

    LEVELS = (LogLevel.INFO, LogLevel.ERROR)

    def __init__(self) -> None:
        # Open for the instance's lifetime; closed (and freed) when the instance goes.
        self.files = [tempfile.TemporaryFile(prefix="sluice-wasi-") for _ in self.LEVELS]  # noqa: SIM115
        self.offsets = [0, 0]
        self.pending = [b"", b""]

    def attach(self, config: wasmtime.WasiConfig) -> None:
        # wasmtime opens the path itself; /proc/self/fd names the open (already unlinked) file.
        config.stdout_file = f"/proc/self/fd/{self.files[0].fileno()}"
        config.stderr_file = f"/proc/self/fd/{self.files[1].fileno()}"

    def drain(self, log: Callable[[LogLevel, str, str], None]) -> None:
        for i, level in enumerate(self.LEVELS):
            fd = self.files[i].fileno()
            data = os.pread(fd, 1 << 16, self.offsets[i])
            if not data:
                continue
            self.offsets[i] += len(data)
            *lines, self.pending[i] = (self.pending[i] + data).split(b"\n")
            for line in lines:
                log(level, "", line.decode("utf-8", "replace"))


# -- the plugin -----------------------------------------------------------------------------------


class ComponentPlugin:
    """One configured component filter: its instance, failure policy and counters."""

    def __init__(self, runtime: _RuntimeLike, module: CompiledComponent, spec: PluginSpec, host: Host) -> None:
        self.runtime = runtime
        self.module = module
        self.spec = spec
        self.host = host
        self.shared_data: SharedData = runtime.shared_data
        self.metric_registry = MetricRegistry()
        """Components define no metrics yet (the world has no metrics interface); kept for the proxy."""
        self.stats = PluginStats()
        self.log_level = spec.log_level
        self.last_error: str | None = None
        self.retired = False
        self._current: _Instance | None = None
        self._instances: set[_Instance] = set()
        self._backoff = spec.reload_backoff_s
        self._next_reload = 0.0

    # -- start-up and instances -------------------------------------------------------------------
    def start(self) -> None:
        """Create the first instance and configure it. Raises PluginLoadError."""
        self._current = self._new_instance()
        self._instances.add(self._current)

    def _new_instance(self) -> _Instance:
        path = self.spec.module_path
        inst = _Instance(self)
        try:
            error = inst.configure(self.spec.configuration.decode("utf-8", "replace"))
        except WasmTrap as exc:
            raise PluginLoadError(path, f"trapped in configure: {exc}") from None
        except ValueError as exc:
            raise PluginLoadError(path, f"configure returned a malformed result: {exc}") from None
        if error is not None:
            raise PluginLoadError(path, f"configure rejected the configuration: {error}")
        return inst

    def restricted_wasi(self, output: _GuestOutput) -> wasmtime.WasiConfig:
        config = wasmtime.WasiConfig()
        config.env = [(k, v) for k, v in self.spec.environment.items()]
        config.argv = [self.spec.name]
        output.attach(config)
        return config

    def guest_log(self, level: LogLevel, context: str, message: str) -> None:
        if level >= self.log_level:
            self.host.log(self.spec.name, level, f"{context}: {message}" if context else message)

    def _instance_for_stream(self) -> _Instance | None:
        current = self._current
        if current is not None and current.dead is None:
            return current
        if time.monotonic() < self._next_reload:
            return None
        self._next_reload = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        try:
            fresh = self._new_instance()
        except PluginLoadError as exc:
            self.stats.reload_failures += 1
            self.last_error = f"reload failed: {exc.reason}"
            self.host.log(self.spec.name, LogLevel.ERROR, f"filter {self.spec.name} {self.last_error}")
            return None
        self.stats.reloads += 1
        if current is not None and current.streams <= 0:
            self._instances.discard(current)
        self._current = fresh
        self._instances.add(fresh)
        return fresh

    # -- streams ------------------------------------------------------------------------------------
    def new_stream(self, info: StreamInfo, callbacks: StreamCallbacks) -> ComponentStream:
        self.stats.streams += 1
        inst = None if self.retired else self._instance_for_stream()
        if inst is None:
            # No usable instance: the stream gets the failure policy (the 503 goes out when the
            # request arrives, as for a proxy-wasm filter).
            stream = ComponentStream(self, None, info, callbacks)
            if self.spec.failure_policy is FailurePolicy.FAIL_OPEN:
                self.stats.fail_open += 1
                stream.bypass = True
            else:
                self.stats.fail_closed += 1
                stream.failed = True
            return stream
        inst.streams += 1
        return ComponentStream(self, inst, info, callbacks)

    def stream_done(self, inst: _Instance) -> None:
        inst.streams -= 1
        if inst.streams <= 0 and (inst is not self._current or self.retired):
            self._instances.discard(inst)
            if inst is self._current:
                self._current = None

    def on_trap(self, exc: WasmTrap, where: str) -> None:
        if exc.deadline:
            self.stats.deadlines += 1
            reason = f"exceeded its CPU deadline of {self.spec.cpu_deadline_ms:g} ms in {where}"
        else:
            self.stats.traps += 1
            reason = f"trapped in {where}: {exc}"
        self.last_error = reason
        self.host.log(self.spec.name, LogLevel.ERROR, f"filter {self.spec.name} {reason}")

    def on_bad_action(self, where: str, reason: str) -> None:
        self.stats.traps += 1
        self.last_error = f"{where} returned an invalid action: {reason}"
        self.host.log(self.spec.name, LogLevel.ERROR, f"filter {self.spec.name} {self.last_error}")

    def retire(self) -> None:
        """Serve only the streams already running; release each instance when they end."""
        self.retired = True
        for inst in list(self._instances):
            if inst.streams <= 0:
                self._instances.discard(inst)
        if self._current is not None and self._current not in self._instances:
            self._current = None

    # -- the proxy-facing counters (as `Plugin` has them) -------------------------------------------
    def get_log_level(self) -> LogLevel:
        return self.log_level

    def set_log_level(self, level: LogLevel) -> None:
        self.log_level = level

    def metrics(self) -> dict[str, int]:
        return self.metric_registry.values()

    @property
    def vm_count(self) -> int:
        return len(self._instances)

    @property
    def active_streams(self) -> int:
        return sum(max(i.streams, 0) for i in self._instances)

    def memory_bytes(self) -> int:
        """Not measured for components (their memories are not exports): 0. The cap still applies."""
        return 0

    @property
    def state(self) -> str:
        if self.retired:
            return "retired"
        current = self._current
        if current is None:
            return "failed"
        if current.dead is not None:
            return "reloading"
        return "ok"

    def report(self) -> PluginReport:
        stats = self.stats
        stats.flush()
        module = self.module
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
            metrics=(),
            last_error=self.last_error,
            log_level=self.log_level,
            vm_count=self.vm_count,
            active_streams=self.active_streams,
            memory_bytes=self.memory_bytes(),
        )


class _RuntimeLike(Protocol):
    """What a ComponentPlugin needs of the Runtime (`Runtime` has these)."""

    engine: wasmtime.Engine
    shared_data: SharedData


# -- one stream -----------------------------------------------------------------------------------


class ComponentStream:
    """One HTTP stream through one component filter; the methods mirror `HttpStream`'s."""

    __slots__ = ("plugin", "inst", "info", "callbacks", "bypass", "failed", "paused", "completed",
                 "request_headers_map", "_stats")

    def __init__(
        self, plugin: ComponentPlugin, inst: _Instance | None, info: StreamInfo, callbacks: StreamCallbacks
    ) -> None:
        self.plugin = plugin
        self.inst = inst
        self.info = info
        self.callbacks = callbacks
        self.bypass = False
        self.failed = False
        self.paused = False
        self.completed = False
        self.request_headers_map: HeaderMap | None = None
        self._stats = plugin.stats

    def fail(self, reason: str | None) -> None:
        """Apply the failure policy to this stream."""
        if self.completed or self.bypass or self.failed:
            return
        plugin = self.plugin
        if reason is not None:
            plugin.last_error = reason
        if plugin.spec.failure_policy is FailurePolicy.FAIL_OPEN:
            plugin.stats.fail_open += 1
            self.bypass = True
            if self.paused:
                self.paused = False
                self.callbacks.continue_request()
        else:
            plugin.stats.fail_closed += 1
            self.failed = True
            self.paused = False
            self.callbacks.send_local_reply(_failure_reply(plugin.spec.name))

    def _active(self) -> _Instance | None:
        inst = self.inst
        if self.bypass or self.failed or inst is None:
            return None
        if inst.dead is not None:
            self.fail(None)
            return None
        return inst

    def _hook(self, name: str, run: Callable[[_Instance], Action]) -> Action | None:
        inst = self._active()
        if inst is None:
            return None
        started = perf_counter()
        try:
            action = run(inst)
        except WasmTrap as exc:
            self.plugin.on_trap(exc, name)
            self.fail(None)
            return None
        except (ValueError, UnicodeDecodeError) as exc:
            self.plugin.on_bad_action(name, str(exc))
            self.fail(None)
            return None
        self._stats.observe(perf_counter() - started)
        return action

    def _status(self) -> FilterStatus:
        if self.bypass:
            return CONTINUE
        return STOP if self.failed else CONTINUE

    # -- request path --------------------------------------------------------------------------
    def request_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus:
        self.request_headers_map = headers
        if self.failed and not self.paused:
            return self._entry_failed()
        action = self._hook("on-request", lambda inst: inst.head_hook("on-request", headers))
        if action is None:
            return self._status()
        return self._request_action(action, headers, "on-request")

    def _request_action(self, action: Action, headers: HeaderMap, where: str) -> FilterStatus:
        if isinstance(action, Edits):
            action.apply(headers)
            return CONTINUE
        if isinstance(action, LocalReply):
            self.paused = False
            self.callbacks.send_local_reply(action)
            return STOP
        if where != "on-request":
            self.plugin.on_bad_action(where, "a callout is only allowed from on-request")
            self.fail(None)
            return self._status()
        return self._start_callout(action, headers)

    def _start_callout(self, callout: Callout, headers: HeaderMap) -> FilterStatus:
        timeout = callout.timeout_ms / 1000 if callout.timeout_ms else None
        accepted = self.plugin.host.http_call(
            callout.cluster, HeaderMap(callout.headers), callout.body, HeaderMap(), timeout,
            self._on_callout_response,
        )
        if not accepted:
            self.plugin.guest_log(LogLevel.WARN, "", f"callout to unknown cluster {callout.cluster!r}")
            action = self._hook("on-callout-response", lambda inst: inst.callout_response(None))
            if action is None:
                return self._status()
            return self._request_action(action, headers, "on-callout-response")
        self.paused = True
        return STOP

    def _on_callout_response(self, response: CallResponse | None) -> None:
        if self.completed or not self.paused:
            return
        headers = self.request_headers_map
        action = self._hook("on-callout-response", lambda inst: inst.callout_response(response))
        if action is None or headers is None:
            return  # failed: the policy already answered or resumed the stream
        status = self._request_action(action, headers, "on-callout-response")
        if status is CONTINUE and self.paused:
            self.paused = False
            self.callbacks.continue_request()

    def request_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus:
        return self._entry_failed() if self.failed else CONTINUE

    def request_trailers(self, trailers: HeaderMap) -> FilterStatus:
        return self._entry_failed() if self.failed else CONTINUE

    def _entry_failed(self) -> FilterStatus:
        if not self.paused:
            # A failed-closed filter answers every request phase with its 503, once.
            self.paused = True
            self.callbacks.send_local_reply(_failure_reply(self.plugin.spec.name))
        return STOP

    # -- response path -------------------------------------------------------------------------
    def response_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus:
        if self.failed or self.bypass:
            return CONTINUE  # a failed filter is skipped on the way back (Envoy)
        action = self._hook("on-response", lambda inst: inst.head_hook("on-response", headers))
        if action is None:
            return CONTINUE
        if isinstance(action, Edits):
            action.apply(headers)
            return CONTINUE
        if isinstance(action, LocalReply):
            self.callbacks.send_local_reply(action)
            return STOP
        self.plugin.on_bad_action("on-response", "a callout is only allowed from on-request")
        self.fail(None)
        return CONTINUE

    def response_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus:
        return CONTINUE

    def response_trailers(self, trailers: HeaderMap) -> FilterStatus:
        return CONTINUE

    # -- end of stream -------------------------------------------------------------------------
    def complete(self) -> None:
        if self.completed:
            return
        self.completed = True
        if self.inst is not None:
            self.plugin.stream_done(self.inst)
        self.request_headers_map = None
        self.callbacks = _DETACHED

