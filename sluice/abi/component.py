"""Filters that are WASI 0.2 components exporting the `sluice:filter@0.1.0` world
(sluice/config/wit/filter.wit), side by side with proxy-wasm modules in one chain.

`ComponentPlugin` presents the proxy exactly what a proxy-wasm `Plugin` does (`name`,
`new_stream`, `report`, `set_log_level`, `retire`), and `ComponentStream` the methods of an
`HttpStream`, so the chain drives both alike and never asks which kind a filter is. What differs
is the contract with the guest: typed hooks instead of callbacks plus host calls.

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
instance may not be entered again after a trap, so a fresh one (new store, `configure` again) is
built from a host timer, never on a request's path, no more often than the reload backoff
allows; until then new streams get the failure policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import TypeVar

import wasmtime
from wasmtime import component as wc

from sluice.histogram import Histogram

from . import diskcache
from . import fastcall_component as fc
from .api import CallResponse, Host, LocalReply, PluginLoadError, PluginSpec, StreamCallbacks, StreamInfo
from .common import CALLBACK_BOUNDS_S, DETACHED, Counters, Replacement, StreamMode, build_report, failure_reply
from .compiled import CompiledComponent
from .fastcall import StoreHandle, WasmTrap, summarize_error
from .headers import HeaderMap
from .report import ModuleInfo, PluginReport, PluginState
from .types import FailurePolicy, FilterStatus, LogLevel, WasmResult
from .vm import VMServices

__all__ = ["ComponentPlugin", "ComponentStream", "compile_component", "is_component"]

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
_A = TypeVar("_A")
_SHARED_ERRORS = {WasmResult.CAS_MISMATCH: "cas-mismatch", WasmResult.NOT_FOUND: "not-found"}

CONTINUE = FilterStatus.CONTINUE
STOP = FilterStatus.STOP


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


def _log(level_name: str, context: str, message: str) -> None:
    owner = _ACTIVE[-1].owner
    level = _LEVELS.get(level_name, LogLevel.INFO)
    if level >= owner._log_level:
        owner._guest_log(level, context, message)


def _shared_get(key: bytes) -> tuple[bytes, int] | str | None:
    inst = _ACTIVE[-1]
    found = inst.shared_data.get(inst.vm_id, key)
    if found is None:
        return None
    try:
        found[0].decode()
    except UnicodeDecodeError:
        return "not-utf8"
    return found


def _shared_set(key: bytes, value: bytes, cas: int) -> str | None:
    inst = _ACTIVE[-1]
    return _shared_error(inst.shared_data.set(inst.vm_id, key, value, cas))


def _shared_delete(key: bytes, cas: int) -> str | None:
    inst = _ACTIVE[-1]
    return _shared_error(inst.shared_data.delete(inst.vm_id, key, cas))


def _shared_error(status: WasmResult) -> str | None:
    """The `error` case of a shared-data result, None for ok."""
    return None if status is WasmResult.OK else _SHARED_ERRORS.get(status, "not-found")


_LINKERS: dict[tuple[bool, bool], wc.Linker] = {}
"""By (WASI imports, compiled host functions: `fastcall_component.native()`)."""


def _linker(engine: wasmtime.Engine, wasi: bool) -> wc.Linker:
    """The linker for components without (False) or with (True) WASI 0.2 imports."""
    key = (wasi, fc.native())
    linker = _LINKERS.get(key)
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
                fc.define_func(logging, "log", fc.HostShape.LOG, _log, f"{LOGGING}#log")
            with root.add_instance(SHARED_DATA) as shared:
                fc.define_func(shared, "get", fc.HostShape.GET_ENTRY, _shared_get, f"{SHARED_DATA}#get")
                fc.define_func(shared, "set", fc.HostShape.SET_CAS, _shared_set, f"{SHARED_DATA}#set")
                fc.define_func(shared, "delete", fc.HostShape.DELETE_CAS, _shared_delete, f"{SHARED_DATA}#delete")
        _LINKERS[key] = linker
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


def _reply(status: int, headers: tuple[tuple[str, str], ...], body: bytes) -> LocalReply:
    return LocalReply(status, body, headers, details="component_reply")


_ACTIONS = fc.ActionBuilders(Edits, _NO_EDITS, _reply, Callout)
"""What the fast-call layer turns an `action` variant into."""


def _decode_configured(addr: int) -> str | None:
    ok, payload = fc.read_result(addr)
    return None if ok else (fc.read_string(payload) if payload else "")


# -- one instance --------------------------------------------------------------------------------


class _Instance:
    """One store with one instance of the component."""

    __slots__ = ("owner", "shared_data", "vm_id", "store", "handle", "funcs", "args", "dead",
                 "streams", "output")

    def __init__(self, owner: ComponentPlugin) -> None:
        self.owner = owner
        services = owner._services
        compiled = owner._module
        spec = owner._spec
        engine = services.engine
        self.shared_data = services.shared_data
        self.vm_id = spec.vm_id
        self.store = wasmtime.Store(engine)
        self.store.set_limits(memory_size=spec.memory_limit)
        self.output: _GuestOutput | None = None
        if compiled.wasi:
            self.output = _GuestOutput()
            self.store.set_wasi(_restricted_wasi(spec, self.output))
        self.handle = StoreHandle(self.store, spec.cpu_deadline_ms)
        self.args = fc.ArgBuffer()
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
            self.funcs[name] = fc.ComponentFunction(
                self.handle, name, func, keep_gil=not compiled.wasi, build=_ACTIONS
            )

    def call(self, run: Callable[[_A], object], arg: _A, *, deadline_ms: float | None = None) -> object:
        """`run(arg)` (one call into the instance) as the active instance, under its deadline."""
        if deadline_ms is None:
            self.handle.arm_deadline()
        else:
            self.handle.arm_deadline_ms(deadline_ms)
        _ACTIVE.append(self)
        try:
            return run(arg)
        except WasmTrap as exc:
            self.dead = str(exc)
            raise
        finally:
            _ACTIVE.pop()
            if self.output is not None:
                self.output.drain(self.owner._guest_log)

    def configure(self, config: str) -> str | None:
        args = self.args
        raw = fc.to_utf8(config)
        args.reset(len(raw) + 64)
        args.alloc(fc.VAL.size)
        args.string(0, raw)
        configure = self.funcs["configure"]
        result = self.call(lambda a: configure.call(a, 1, _decode_configured), args, deadline_ms=CONFIGURE_DEADLINE_MS)
        assert result is None or isinstance(result, str)
        return result

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
        action = self.funcs["on-callout-response"].action
        return self.call(lambda a: action(a, 1), args)  # type: ignore[return-value]


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


def _restricted_wasi(spec: PluginSpec, output: _GuestOutput) -> wasmtime.WasiConfig:
    """WASI 0.2 with nothing granted: no preopens, no network; the environment is the filter's
    `environment`; stdout/stderr go to `output` (the filter's log)."""
    config = wasmtime.WasiConfig()
    config.env = list(spec.environment.items())
    config.argv = [spec.name]
    output.attach(config)
    return config


# -- the plugin -----------------------------------------------------------------------------------


class ComponentPlugin:
    """One configured component filter. The proxy uses `name`, `new_stream`, `report`,
    `set_log_level`, `retire`, exactly as of a proxy-wasm `Plugin`."""

    def __init__(self, services: VMServices, module: CompiledComponent, spec: PluginSpec, host: Host) -> None:
        self._services = services
        self._module = module
        self._spec = spec
        self._host = host
        self._counters = Counters()
        self._callback_time = Histogram(CALLBACK_BOUNDS_S)
        self._log_level = spec.log_level
        self._last_error: str | None = None
        self._retired = False
        self._current: _Instance | None = None
        self._instances: set[_Instance] = set()
        """Live instances: the current one and those still finishing streams."""
        self._replacement = Replacement(host, spec.reload_backoff_s, self._replace_instance)
        self._replace_failed = False

    @classmethod
    def start(cls, services: VMServices, module: CompiledComponent, spec: PluginSpec, host: Host) -> ComponentPlugin:
        """A plugin with its first instance, configured. Raises PluginLoadError."""
        plugin = cls(services, module, spec, host)
        plugin._current = plugin._new_instance()
        plugin._instances.add(plugin._current)
        return plugin

    @property
    def name(self) -> str:
        return self._spec.name

    def set_log_level(self, level: LogLevel) -> None:
        self._log_level = level

    # -- instances ----------------------------------------------------------------------------------
    def _new_instance(self) -> _Instance:
        path = self._spec.module_path
        inst = _Instance(self)
        try:
            error = inst.configure(self._spec.configuration.decode("utf-8", "replace"))
        except WasmTrap as exc:
            raise PluginLoadError(path, f"trapped in configure: {exc}") from None
        except ValueError as exc:
            raise PluginLoadError(path, f"configure returned a malformed result: {exc}") from None
        if error is not None:
            raise PluginLoadError(path, f"configure rejected the configuration: {error}")
        return inst

    def _guest_log(self, level: LogLevel, context: str, message: str) -> None:
        if level >= self._log_level:
            self._host.log(self._spec.name, level, f"{context}: {message}" if context else message)

    def _replace_instance(self) -> bool:
        """Build a fresh instance (run by `Replacement`, from a timer, as `Plugin` replaces a VM);
        whether it succeeded."""
        try:
            fresh = self._new_instance()
        except PluginLoadError as exc:
            self._counters.reload_failures += 1
            self._replace_failed = True
            self._last_error = f"reload failed: {exc.reason}"
            self._host.log(self._spec.name, LogLevel.ERROR, f"filter {self._spec.name} {self._last_error}")
            return False
        self._counters.reloads += 1
        self._replace_failed = False
        old = self._current
        if old is not None and old.streams <= 0:
            self._instances.discard(old)
        self._current = fresh
        self._instances.add(fresh)
        return True

    # -- streams ------------------------------------------------------------------------------------
    def new_stream(self, info: StreamInfo, callbacks: StreamCallbacks) -> ComponentStream:
        self._counters.streams += 1
        inst = self._current
        if inst is None or inst.dead is not None or self._retired:
            # No usable instance: the stream gets the failure policy (the 503 goes out when the
            # request arrives, as for a proxy-wasm filter).
            if self._spec.failure_policy is FailurePolicy.FAIL_OPEN:
                self._counters.fail_open += 1
                return ComponentStream(self, None, info, callbacks, _BYPASS)
            self._counters.fail_closed += 1
            return ComponentStream(self, None, info, callbacks, _FAILED)
        inst.streams += 1
        return ComponentStream(self, inst, info, callbacks, _WASM)

    def _stream_done(self, inst: _Instance) -> None:
        inst.streams -= 1
        if inst.streams <= 0 and (inst is not self._current or self._retired):
            self._instances.discard(inst)
            if inst is self._current:
                self._current = None

    def retire(self) -> None:
        """Serve only the streams already running; release each instance when they end."""
        self._retired = True
        self._replacement.stop()
        for inst in list(self._instances):
            if inst.streams <= 0:
                self._instances.discard(inst)
        if self._current is not None and self._current not in self._instances:
            self._current = None

    # -- failures ----------------------------------------------------------------------------------
    def _on_trap(self, inst: _Instance, exc: WasmTrap, where: str) -> None:
        if exc.deadline:
            self._counters.deadlines += 1
            reason = f"exceeded its CPU deadline of {self._spec.cpu_deadline_ms:g} ms in {where}"
        else:
            self._counters.traps += 1
            reason = f"trapped in {where}: {exc}"
        self._failed(reason)
        # A component instance may not be entered again after a trap.
        if inst is self._current:
            self._replacement.schedule()

    def _on_bad_action(self, where: str, reason: str) -> None:
        self._counters.traps += 1
        self._failed(f"{where} returned an invalid action: {reason}")

    def _failed(self, reason: str) -> None:
        self._last_error = reason
        self._host.log(self._spec.name, LogLevel.ERROR, f"filter {self._spec.name} {reason}")

    # -- reporting ---------------------------------------------------------------------------------
    def report(self) -> PluginReport:
        """Everything the proxy may know about this filter, as frozen values read now.

        `memory_bytes` is 0: a component's memories are not exports (the cap still applies), and
        components define no metrics (the world has no metrics interface)."""
        module = self._module
        return build_report(
            self._spec.name, self._state(),
            ModuleInfo(str(module.path), module.sha256, module.size, module.abi_version),
            self._counters, self._callback_time, (), self._last_error, self._log_level,
            vm_count=len(self._instances),
            active_streams=sum(max(i.streams, 0) for i in self._instances),
            memory_bytes=0,
        )

    def _state(self) -> PluginState:
        if self._retired:
            return PluginState.RETIRED
        current = self._current
        if current is None or (current.dead is not None and self._replace_failed):
            return PluginState.FAILED
        if current.dead is not None:
            return PluginState.RELOADING
        return PluginState.OK


# -- one stream -----------------------------------------------------------------------------------


def _head_hook(inst: _Instance, name: str, headers: HeaderMap) -> Action:
    """`on-request` / `on-response`: a function, not a closure, on the hot path."""
    return inst.call(inst.funcs[name].head, headers.items())  # type: ignore[return-value]


def _callout_response_hook(inst: _Instance, _name: str, response: CallResponse | None) -> Action:
    return inst.callout_response(response)


# Module-level aliases, as in plugin.py (cheaper than reading members off the enum class).
_WASM = StreamMode.WASM
_FAILED = StreamMode.FAILED
_BYPASS = StreamMode.BYPASS


class ComponentStream:
    """One HTTP stream through one component filter; the methods are `HttpStream`'s."""

    __slots__ = ("_plugin", "_inst", "info", "_callbacks", "_mode", "paused", "completed", "_request_headers",
                 "_observe")

    # The sluice:filter world has no body hooks: a component never changes a body.
    reads_request_body = False
    reads_response_body = False

    def __init__(
        self, plugin: ComponentPlugin, inst: _Instance | None, info: StreamInfo, callbacks: StreamCallbacks,
        mode: StreamMode,
    ) -> None:
        self._plugin = plugin
        self._inst = inst
        self.info = info
        self._callbacks = callbacks
        self._mode = mode
        self.paused = False
        self.completed = False
        self._request_headers: HeaderMap | None = None
        self._observe = plugin._callback_time.observe

    def _fail(self) -> None:
        """Apply the failure policy to this stream."""
        if self.completed or self._mode is not _WASM:
            return
        plugin = self._plugin
        if plugin._spec.failure_policy is FailurePolicy.FAIL_OPEN:
            plugin._counters.fail_open += 1
            self._mode = _BYPASS
            if self.paused:
                self.paused = False
                self._callbacks.continue_request()
        else:
            plugin._counters.fail_closed += 1
            self._mode = _FAILED
            self.paused = False
            self._callbacks.send_local_reply(failure_reply(plugin._spec.name))

    def _active(self) -> _Instance | None:
        inst = self._inst
        if self._mode is not _WASM or inst is None:
            return None
        if inst.dead is not None:
            self._fail()
            return None
        return inst

    def _hook(self, name: str, run: Callable[[_Instance, str, _A], Action], arg: _A) -> Action | None:
        """`run(instance, name, arg)`, the call of hook `name`, with the failure policy applied to
        traps and malformed results; the action, or None when the stream failed or bypasses."""
        inst = self._active()
        if inst is None:
            return None
        started = perf_counter()
        try:
            action = run(inst, name, arg)
        except WasmTrap as exc:
            self._plugin._on_trap(inst, exc, name)
            self._fail()
            return None
        except (ValueError, UnicodeDecodeError) as exc:
            self._plugin._on_bad_action(name, str(exc))
            self._fail()
            return None
        self._observe(perf_counter() - started)
        return action

    def _status(self) -> FilterStatus:
        return STOP if self._mode is _FAILED else CONTINUE

    # -- request path --------------------------------------------------------------------------
    def request_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus:
        self._request_headers = headers
        if self._mode is _FAILED:
            return self._entry_failed()
        action = self._hook("on-request", _head_hook, headers)
        if action is None:
            return self._status()
        return self._request_action(action, headers, "on-request")

    def _request_action(self, action: Action, headers: HeaderMap, where: str) -> FilterStatus:
        if isinstance(action, Edits):
            action.apply(headers)
            return CONTINUE
        if isinstance(action, LocalReply):
            self.paused = False
            self._callbacks.send_local_reply(action)
            return STOP
        if where != "on-request":
            self._plugin._on_bad_action(where, "a callout is only allowed from on-request")
            self._fail()
            return self._status()
        return self._start_callout(action, headers)

    def _start_callout(self, callout: Callout, headers: HeaderMap) -> FilterStatus:
        timeout = callout.timeout_ms / 1000 if callout.timeout_ms else None
        plugin = self._plugin
        accepted = plugin._host.http_call(
            callout.cluster, HeaderMap(callout.headers), callout.body, HeaderMap(), timeout,
            self._on_callout_response,
        )
        if not accepted:
            plugin._guest_log(LogLevel.WARN, "", f"callout to unknown cluster {callout.cluster!r}")
            action = self._hook("on-callout-response", _callout_response_hook, None)
            if action is None:
                return self._status()
            return self._request_action(action, headers, "on-callout-response")
        self.paused = True
        return STOP

    def _on_callout_response(self, response: CallResponse | None) -> None:
        if self.completed or not self.paused:
            return
        headers = self._request_headers
        action = self._hook("on-callout-response", _callout_response_hook, response)
        if action is None or headers is None:
            return  # failed: the policy already answered or resumed the stream
        status = self._request_action(action, headers, "on-callout-response")
        if status is CONTINUE and self.paused:
            self.paused = False
            self._callbacks.continue_request()

    def request_body(self, body: bytearray, end_of_stream: bool) -> FilterStatus:
        return self._entry_failed() if self._mode is _FAILED else CONTINUE

    def request_trailers(self, trailers: HeaderMap) -> FilterStatus:
        return self._entry_failed() if self._mode is _FAILED else CONTINUE

    def _entry_failed(self) -> FilterStatus:
        if not self.paused:
            # A failed-closed filter answers every request phase with its 503, once.
            self.paused = True
            self._callbacks.send_local_reply(failure_reply(self._plugin._spec.name))
        return STOP

    # -- response path -------------------------------------------------------------------------
    def response_headers(self, headers: HeaderMap, end_of_stream: bool) -> FilterStatus:
        if self._mode is not _WASM:
            return CONTINUE  # a failed filter is skipped on the way back (Envoy)
        action = self._hook("on-response", _head_hook, headers)
        if action is None:
            return CONTINUE
        if isinstance(action, Edits):
            action.apply(headers)
            return CONTINUE
        if isinstance(action, LocalReply):
            self._callbacks.send_local_reply(action)
            return STOP
        self._plugin._on_bad_action("on-response", "a callout is only allowed from on-request")
        self._fail()
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
        if self._inst is not None:
            self._plugin._stream_done(self._inst)
        self._request_headers = None
        self._callbacks = DETACHED
