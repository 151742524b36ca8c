"""Fast calls between Python and wasm through wasmtime's raw *unchecked* C API.

This module, its compiled half (`_fastcall`, C declarations in `_wasmtime.pxd`) and its component
half (`fastcall_component`, which takes its C entry points from `raw_function` here, after the
version check) are the only ones in sluice that touch ctypes or wasmtime-py's private API
(`wasmtime._ffi`, `Store._context`, `Func._func`, `Memory._memory`, `WasmtimeError._from_ptr`).
Those are not a stable interface, so importing this module checks that the installed wasmtime is
the version sluice is pinned to (`WASMTIME_VERSION`) and refuses to run on any other.
wasmtime-py's high-level `Func.__call__` costs ~25 µs per call into wasm and its host-function
trampoline ~8 µs per call out; through ctypes on the unchecked API they cost ~1.2 µs and ~0.45 µs;
the compiled `_fastcall` (Cython, built by `pip install`) makes them a fraction of that, because
nothing is boxed but what Python sees and no ctypes object or libffi call is involved: arguments
and results travel in one preallocated array of 16-byte `wasmtime_val_raw_t` slots, a host
function's C trampoline calls its Python implementation by vectorcall.

Layers (wasmtime-py itself wraps the C API the same way):

* `engine()`: one engine per process with epoch interruption, and a native ticker (one thread of
  the compiled `_ticker`, else a POSIX timer) that advances the epoch, so every call into wasm
  gets a wall-clock deadline.
* `HostFunction` / `define_host_functions`: host functions defined once on a `Linker`; each
  dispatches to the *active* instance's Python implementation (`ACTIVE[-1]`), so instantiating a
  VM does not define anything new.
* `StoreHandle`: a store's raw context and its per-call epoch deadline.
* `WasmFunction`: a callable for one exported function of one instance.
* `LinearMemory`: bounds-checked reads and writes of an instance's memory through its data
  pointer; relies on `memory_may_move = False` so the base address is stable.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import functools
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, Protocol

import wasmtime

try:
    from . import _fastcall
except ImportError as exc:  # pragma: no cover - an install without its compiled part
    raise ImportError(
        f"sluice.abi._fastcall is not built ({exc}): install sluice with pip (it compiles the extension "
        f"with the machine's C compiler), e.g. pip install -e ."
    ) from exc

WASMTIME_VERSION = "50.0.1"
"""The wasmtime-py release this module's use of private API was written against (pyproject pins it)."""


def _check_wasmtime_version() -> None:
    try:
        installed = metadata.version("wasmtime")
    except metadata.PackageNotFoundError:
        installed = getattr(wasmtime, "__version__", "unknown")
    if installed != WASMTIME_VERSION:
        raise ImportError(
            f"sluice needs wasmtime {WASMTIME_VERSION} but wasmtime {installed} is installed: its fast-call "
            f"layer uses wasmtime-py internals that change between releases. "
            f"Install the pinned version: pip install 'wasmtime=={WASMTIME_VERSION}'"
        )


_check_wasmtime_version()

from wasmtime import _ffi as ffi  # noqa: E402 - only once the version is known to match

from sluice.histogram import HistogramSnapshot  # noqa: E402

from .types import LogLevel, WasmResult  # noqa: E402

# The raw entry points. The hot ones are only looked up here: `_fastcall` calls them from C, by
# address. `argtypes` stays unset on the others where every argument is already a ctypes object.
_dll = ffi.dll
# The same library loaded as a PyDLL: its functions keep the GIL (see `engine`).
_pydll = ctypes.PyDLL(_dll._name)


def _address(name: str) -> int:
    address = ctypes.cast(_dll._FuncPtr((name, _dll)), ctypes.c_void_p).value
    if not address:
        raise ImportError(f"wasmtime's C library has no {name}")
    return address


_increment_epoch = _dll._FuncPtr(("wasmtime_engine_increment_epoch", _dll))
_increment_epoch.restype = None
_trap_code = _dll._FuncPtr(("wasmtime_trap_code", _dll))
_trap_code.restype = ctypes.c_bool
_trap_code.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8)]
_error_exit_status = _dll._FuncPtr(("wasmtime_error_exit_status", _dll))
_error_exit_status.restype = ctypes.c_bool
_error_exit_status.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
_TRAP_CODE_INTERRUPT = int(ffi.wasmtime_trap_code_enum.WASMTIME_TRAP_CODE_INTERRUPT.value)

# Value kinds in signatures: i = i32 (signed), I = i32 read as unsigned, q = i64, Q = i64 unsigned,
# f = f32, d = f64.
_WASM_TYPE = {"i": wasmtime.ValType.i32(), "I": wasmtime.ValType.i32(), "q": wasmtime.ValType.i64(),
              "Q": wasmtime.ValType.i64(), "f": wasmtime.ValType.f32(), "d": wasmtime.ValType.f64()}


class WasmTrap(Exception):
    """A call into wasm ended in a trap, an error, a deadline or `proc_exit`."""

    def __init__(self, message: str, *, deadline: bool = False, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.deadline = deadline
        self.exit_code = exit_code


class HostTrap(Exception):
    """Raised by a host function to make the calling wasm code trap (e.g. WASI `proc_exit`)."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- engine ----------------------------------------------------------------------------------

EPOCH_TICK_S = 0.002
"""One epoch tick. Deadlines are rounded up to whole ticks (20 ms -> 10 ticks)."""


def _make_engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.cranelift_opt_level = "speed"
    # A stable base address lets LinearMemory keep one view of memory across calls; 32-bit
    # memories live in a 4 GiB reservation anyway, so growth never needs to move them.
    config.memory_may_move = False
    config.parallel_compilation = True
    return wasmtime.Engine(config)


class _SigVal(ctypes.Union):
    _fields_ = [("sival_int", ctypes.c_int), ("sival_ptr", ctypes.c_void_p)]


class _SigEvent(ctypes.Structure):
    """Linux's `struct sigevent` (64 bytes) with the SIGEV_THREAD member of its union."""

    _fields_ = [
        ("sigev_value", _SigVal),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("sigev_notify_function", ctypes.c_void_p),
        ("sigev_notify_attributes", ctypes.c_void_p),
        ("_pad", ctypes.c_byte * 32),
    ]


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


_SIGEV_THREAD = 2
_CLOCK_MONOTONIC = 1


def _start_thread_ticker(engine: wasmtime.Engine) -> bool:
    """Advance the epoch from one native thread (the compiled `_ticker`): no Python runs, no
    thread is created per tick. Returns False when the extension was not built."""
    try:
        from . import _ticker
    except ImportError:
        return False
    # The thread gets its own handle on the (reference-counted) engine and never gives it back.
    handle = ffi.wasmtime_engine_clone(engine.ptr())
    engine_address = ctypes.cast(handle, ctypes.c_void_p).value
    tick_address = ctypes.cast(_increment_epoch, ctypes.c_void_p).value
    if not engine_address or not tick_address:
        return False
    if not _ticker.start(tick_address, engine_address, int(EPOCH_TICK_S * 1e9)):
        return False
    atexit.register(_ticker.stop)
    return True


def _start_native_ticker(engine: wasmtime.Engine) -> bool:
    """Advance the epoch from a POSIX timer whose notify function *is*
    `wasmtime_engine_increment_epoch`: no Python runs, so no GIL is needed to tick.

    `union sigval` is passed like a pointer on the supported ABIs (x86-64 SysV, AArch64), so the
    timer hands the engine pointer straight to wasmtime. Returns False where unavailable.
    """
    if sys.platform != "linux" or ctypes.sizeof(_SigEvent) != 64:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timer_create = libc.timer_create
        timer_settime = libc.timer_settime
    except (OSError, AttributeError):
        return False
    # The timer gets its own handle on the (reference-counted) engine and never gives it back:
    # the engine outlives every tick, even during interpreter shutdown.
    handle = ffi.wasmtime_engine_clone(engine.ptr())
    event = _SigEvent()
    event.sigev_value.sival_ptr = ctypes.cast(handle, ctypes.c_void_p).value
    event.sigev_notify = _SIGEV_THREAD
    event.sigev_notify_function = ctypes.cast(_increment_epoch, ctypes.c_void_p).value
    timer = ctypes.c_void_p()
    if timer_create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(timer)) != 0:
        return False
    period = _TimeSpec(0, int(EPOCH_TICK_S * 1e9))
    if timer_settime(timer, 0, ctypes.byref(_ITimerSpec(period, period)), None) != 0:
        libc.timer_delete(timer)
        return False
    # Stop ticking before the interpreter tears down (the engine handle itself stays valid).
    atexit.register(libc.timer_delete, timer)
    return True


class _ThreadTicker:
    """Fallback ticker: a daemon thread. It needs the GIL, so calls into wasm must release it."""

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine_ptr = ctypes.c_void_p(ctypes.cast(engine.ptr(), ctypes.c_void_p).value)
        threading.Thread(target=self._run, name="sluice-epoch", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(EPOCH_TICK_S)
            _increment_epoch(self._engine_ptr)


_ENGINE: wasmtime.Engine | None = None
TICKER: list[str] = [""]
"""Which ticker advances the epoch once the engine exists: "thread" (the compiled `_ticker`),
"timer" (a POSIX timer, one thread created per tick by libc) or "python" (a Python thread)."""
_engine_lock = threading.Lock()


def engine() -> wasmtime.Engine:
    """The process's engine, with its epoch ticking every `EPOCH_TICK_S` from first use on.

    One engine per process (wasmtime's advice): compiled modules are shareable and one ticker
    serves every store. It is never freed, so the ticker can never touch a dead engine.
    """
    global _ENGINE
    with _engine_lock:
        if _ENGINE is None:
            made = _make_engine()
            if _start_thread_ticker(made):
                TICKER[0] = "thread"
            elif _start_native_ticker(made):
                TICKER[0] = "timer"
            if TICKER[0]:
                # The epoch advances without Python, so a call into wasm may keep the GIL: that
                # saves a release and re-acquire on every call and host call (~7% of a stream).
                # A runaway filter is still interrupted, by the native timer.
                _fastcall.keep_gil(True)
            else:
                TICKER[0] = "python"
                _ThreadTicker(made)
            _ENGINE = made
        return _ENGINE


def native_ticker() -> bool:
    """Whether the epoch advances without Python (the native thread or POSIX timer of `engine()`):
    then calls into wasm may keep the GIL, since nothing Python needs to run to interrupt a
    runaway filter."""
    return TICKER[0] in ("thread", "timer")


def raw_function(name: str, restype: Any, *, keep_gil: bool = False) -> Any:
    """An entry point of wasmtime's C library with no `argtypes` (callers pass ctypes objects of
    the right width), keeping the GIL during the call if `keep_gil` (only with `native_ticker()`).
    For the component half of this layer (`fastcall_component`)."""
    lib = _pydll if keep_gil else _dll
    fn = lib._FuncPtr((name, lib))
    fn.restype = restype
    return fn


def wasmtime_error(err: int) -> wasmtime.WasmtimeError:
    """Take ownership of a `wasmtime_error_t*` returned by the C API."""
    return wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t)))


def deadline_ticks(deadline_ms: float) -> int:
    # +1: the current tick may be about to end, so a deadline is never shorter than asked.
    return max(1, int(-(-deadline_ms // (EPOCH_TICK_S * 1000)))) + 1


# -- host functions --------------------------------------------------------------------------


class HostDispatch(Protocol):
    """The active instance: its host-function implementations, indexed like the definitions."""

    host_impls: list[Callable[..., Any]]


ACTIVE: list[HostDispatch] = []
"""Stack of instances currently executing wasm; host calls dispatch to the top one."""


@dataclasses.dataclass(frozen=True)
class HostFunction:
    module: str
    name: str
    params: str
    results: str = ""
    """At most one result kind."""


_EXIT_STATUS: list[int | None] = [None]
"""The exit status a host function (WASI `proc_exit`) ended the running call with, until the call
that it unwound reports it. A host trap reaches the caller as a plain wasmtime error, which carries
no exit status of its own."""


def _host_failure(label: bytes, exc: BaseException) -> bytes:
    """The trap message for a host function that raised (called by `_fastcall`'s trampoline);
    a `HostTrap`'s exit status is kept for the call it unwinds (`_raise_call_failure`)."""
    if isinstance(exc, HostTrap):
        if exc.exit_code is not None:
            _EXIT_STATUS[0] = exc.exit_code
        return str(exc).encode()
    return f"host function {label.decode()} failed: {type(exc).__name__}: {exc}".encode()


_DEFINITIONS: dict[tuple[HostFunction, int | float | None], tuple[int, wasmtime.FuncType]] = {}
"""One C definition (`_fastcall.host_definition`) and function type per host function, kept for
the life of the process and shared by every linker that defines it. Key: (definition, its index
in a table) for host functions, (definition, the constant) for constant functions."""


def _define(linker: wasmtime.Linker, fn: HostFunction, key: int | float | None, make: Callable[[], int]) -> None:
    entry = _DEFINITIONS.get((fn, key))
    if entry is None:
        ty = wasmtime.FuncType([_WASM_TYPE[k] for k in fn.params], [_WASM_TYPE[k] for k in fn.results])
        entry = _DEFINITIONS[(fn, key)] = (make(), ty)
    definition, ty = entry
    err = _fastcall.define(
        _pointer(linker.ptr()), fn.module.encode(), fn.name.encode(), _pointer(ty.ptr()), definition
    )
    if err:
        raise wasmtime_error(err)


def _pointer(ptr: Any) -> int:
    """The address a ctypes pointer holds."""
    return ctypes.cast(ptr, ctypes.c_void_p).value or 0


def define_host_functions(linker: wasmtime.Linker, functions: Sequence[HostFunction]) -> None:
    """Define `functions` on `linker`; function i dispatches to `ACTIVE[-1].host_impls[i]`.

    Callbacks are made once per definition, so defining the same table on another linker (for
    a module with stubbed imports, see `define_constant_functions`) creates no ctypes objects.
    """
    for index, fn in enumerate(functions):
        label = f"{fn.module}.{fn.name}".encode()
        _define(linker, fn, index, functools.partial(_fastcall.host_definition, index, fn.params, fn.results, label))


def define_constant_functions(linker: wasmtime.Linker, functions: Sequence[tuple[HostFunction, int | float]]) -> None:
    """Define each function as one that ignores its arguments and returns the constant (for
    imports the host does not implement). Needs no active instance: it touches no memory."""
    for fn, value in functions:
        result = (float(value) if fn.results in ("f", "d") else int(value)) if fn.results else 0
        label = f"{fn.module}.{fn.name}".encode()
        make = functools.partial(_fastcall.host_definition, 0, fn.params, fn.results, label, result)
        _define(linker, fn, value if fn.results else None, make)


def import_signature(ty: wasmtime.FuncType) -> tuple[str, str]:
    """Kinds string of an imported function type (at most one result), or raise ValueError."""
    params, results = _signature(ty, _IMPORT_KINDS)
    if len(results) > 1:
        raise ValueError("more than one result")
    return params, results


# -- calls into wasm -------------------------------------------------------------------------


def _context_ptr(store: wasmtime.Store) -> ctypes.c_void_p:
    return ctypes.c_void_p(ctypes.cast(store._context(), ctypes.c_void_p).value)


class StoreHandle(_fastcall.Deadline):
    """The raw context of one store (`ctx` for ctypes callers, `address` for `_fastcall`), and its
    per-call epoch deadline: `arm_deadline()` before each outermost call into wasm gives it the
    store's full CPU deadline (a native call, so it is made before every callback)."""

    __slots__ = ("store", "ctx")

    def __init__(self, store: wasmtime.Store, deadline_ms: float) -> None:
        ctx = _context_ptr(store)
        # One tick more than the deadline needs: each callback gets at least the budget it had
        # when re-arming was skipped within a tick (so a busy host never shortens a filter's time).
        super().__init__(ctx.value or 0, deadline_ticks(deadline_ms) + 1)
        self.store = store
        self.ctx = ctx

    def arm_deadline_ms(self, deadline_ms: float) -> None:
        """Give the next call into wasm its own deadline (start-up callbacks)."""
        self.arm_ticks(deadline_ticks(deadline_ms))


def _raise_call_failure(err: int, trap: int) -> None:
    """Turn a failed call into a `WasmTrap`, classified by what wasmtime and our host functions
    report (trap code, exit status), never by the wording of the message."""
    exit_code, _EXIT_STATUS[0] = _EXIT_STATUS[0], None
    if err:
        status = ctypes.c_int(0)
        wasi_exit = bool(_error_exit_status(err, ctypes.byref(status)))
        error = wasmtime_error(err)
        if wasi_exit:  # wasmtime's own WASI exit (an ExitTrap)
            raise WasmTrap(f"proc_exit({status.value})", exit_code=status.value)
        raise WasmTrap(summarize_error(str(error)), exit_code=exit_code)
    code = ctypes.c_uint8(0)
    deadline = bool(_trap_code(trap, ctypes.byref(code))) and code.value == _TRAP_CODE_INTERRUPT
    t = wasmtime.Trap._from_ptr(ctypes.cast(trap, ctypes.POINTER(ffi.wasm_trap_t)))
    if deadline:
        raise WasmTrap("cpu deadline exceeded", deadline=True)
    raise WasmTrap(summarize_error(t.message), exit_code=exit_code)


def summarize_error(message: str) -> str:
    """One line from wasmtime's error text.

    wasmtime writes a context line, optionally a backtrace, then "Caused by:" and the reason.
    Keep "context (reason)", or just the reason when the context is only the backtrace header.
    """
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return message
    if "Caused by:" in lines:
        at = lines.index("Caused by:")
        cause = " ".join(lines[at + 1 :]).removeprefix("wasm trap: ")
        head = lines[0]
        if not cause:
            return head
        return cause if head.startswith("error while executing at wasm backtrace") else f"{head} ({cause})"
    return lines[0].removeprefix("wasm trap: ")


class WasmFunction(_fastcall.Func):
    """One exported function of one instance, callable with plain ints; the caller arms the
    epoch deadline first (`StoreHandle.arm_deadline`). Raises WasmTrap."""

    __slots__ = ()

    def __init__(self, handle: StoreHandle, name: str, func: wasmtime.Func, params: str, results: str) -> None:
        # The wasmtime_func_t (store id, index) is copied: nothing of `func` needs to stay alive.
        super().__init__(handle.address, ctypes.addressof(func._func), name, params, results)


def export_signature(ty: wasmtime.FuncType) -> tuple[str, str]:
    """Kinds string of a function type, or raise ValueError for types sluice never calls."""
    return _signature(ty, _EXPORT_KINDS)


_EXPORT_KINDS = {"i32": "i", "i64": "q", "f64": "d"}
"""Value types of the exports sluice calls."""
_IMPORT_KINDS = {**_EXPORT_KINDS, "f32": "f"}
"""Value types a stubbed import may use (stubs never read their arguments)."""


def _signature(ty: wasmtime.FuncType, names: dict[str, str]) -> tuple[str, str]:
    """(params, results) kinds of `ty`, or ValueError for a type outside `names`."""

    def kinds(types: Sequence[wasmtime.ValType]) -> str:
        out = []
        for t in types:
            key = str(t)
            if key not in names:
                raise ValueError(f"unsupported value type {key}")
            out.append(names[key])
        return "".join(out)

    return kinds(ty.params), kinds(ty.results)


# -- linear memory ---------------------------------------------------------------------------


class LinearMemory(_fastcall.Memory):
    """Bounds-checked access to one instance's memory (`_fastcall.Memory`: reads, writes and the
    returned-buffer writes through the data pointer, answering None/False out of bounds)."""

    __slots__ = ()

    def __init__(self, handle: StoreHandle, memory: wasmtime.Memory) -> None:
        super().__init__(handle.address, ctypes.addressof(memory._memory))


class NoMemory:
    """Stands in for LinearMemory before an instance exists: every access is out of bounds."""

    size = 0

    def fits(self, ptr: int, length: int) -> bool:
        return False

    def read(self, ptr: int, length: int) -> bytes | None:
        return None

    def write(self, ptr: int, data: bytes) -> bool:
        return False

    def write_u32(self, ptr: int, value: int) -> bool:
        return False

    def write_u64(self, ptr: int, value: int) -> bool:
        return False

    def write_returned(self, ptr: int, data: bytes, ptr_ptr: int, size_ptr: int) -> bool:
        return False


_SIZES = tuple(ctypes.sizeof(t) for t in (ffi.wasmtime_func_t, ffi.wasmtime_memory_t, ffi.wasmtime_val_raw_t))
if _fastcall.struct_sizes() != _SIZES:
    raise ImportError(f"sluice.abi._fastcall was built for other wasmtime struct layouts "
                      f"({_fastcall.struct_sizes()} bytes, wasmtime-py has {_SIZES}): reinstall sluice")
_fastcall.init(
    _address("wasmtime_func_call_unchecked"), _address("wasmtime_context_set_epoch_deadline"),
    _address("wasmtime_memory_data"), _address("wasmtime_memory_data_size"), _address("wasmtime_trap_new"),
    _address("wasmtime_linker_define_func_unchecked"), ACTIVE, _raise_call_failure, _host_failure, WasmTrap,
)
_fastcall.set_constants(tuple(LogLevel), tuple(WasmResult))

HostCalls = _fastcall.HostCalls
"""The compiled host functions (proxy_log, reading a header value or a whole map, removing a
header, adding or replacing one within the filter's header-map limits, getting and setting shared
data, incrementing and recording a metric): the base of
`hostcalls.ProxyHostCalls`."""
return_bytes = _fastcall.return_bytes
"""The returned-buffer protocol (reference 4.2) on `vm.memory` with `vm.allocator`."""
serialize_pairs = _fastcall.serialize_pairs
"""serialize_pairs(items): (name, value) pairs, str or bytes, in the proxy-wasm pairs format
(reference 4.1: u32 count, (u32 key_len, u32 value_len) each, then key NUL value NUL each), in C:
proxy_get_header_map_pairs answers with it."""
header_get = _fastcall.header_get
"""header_get(hmap, name): what `HeaderMap.get(name)` answers, compiled (proxy_get_header_map_value)."""
header_add_within = _fastcall.header_add_within
"""header_add_within(hmap, name, value, max_entries, max_bytes): `HeaderMap.add` unless the map
would then hold more than `max_entries` entries or `max_bytes` bytes; answers HEADER_FITS (added),
HEADER_TOO_MANY or HEADER_TOO_LARGE (unchanged). What proxy_add_header_map_value does, compiled."""
header_set_within = _fastcall.header_set_within
"""header_set_within(hmap, name, value, max_entries, max_bytes): the same for `HeaderMap.set` of a
lower-case `name` (proxy_replace_header_map_value)."""
HEADER_FITS = _fastcall.HEADER_FITS
HEADER_TOO_MANY = _fastcall.HEADER_TOO_MANY
HEADER_TOO_LARGE = _fastcall.HEADER_TOO_LARGE


class CallbackTimes(_fastcall.CallbackTimes):
    """Stream callbacks' wall times, bucketed in C as each timed call returns (`invoke(...,
    timing=...)`), read as a `histogram.HistogramSnapshot`."""

    __slots__ = ()

    def snapshot(self) -> HistogramSnapshot:
        bounds, counts, total, count = self.state()
        return HistogramSnapshot(bounds, counts, total, count)


LogThreshold = _fastcall.LogThreshold
"""A filter's log level shared by its plugin and VMs: `threshold()` is the `LogLevel`, and the
compiled proxy_log compares with it without a call into Python."""
Frame = _fastcall.Frame
"""One callback in progress (`vm.WasmVM.frames`): the context it runs for and what it may see."""
VMCore = _fastcall.VMCore
invoke = _fastcall.invoke
invoke_each = _fastcall.invoke_each
StreamCore = _fastcall.StreamCore
"""The fields and per-request calls of one filter's stream (`plugin.HttpStream`, `vm.StreamContext`)."""
set_stream_constants = _fastcall.set_stream_constants
