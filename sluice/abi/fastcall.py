"""Fast calls between Python and wasm through wasmtime's raw *unchecked* C API.

This module and its component half (`fastcall_component`, which takes its C entry points from
`raw_function` here, after the version check) are the only ones in sluice that touch ctypes or
wasmtime-py's private API (`wasmtime._ffi`,
`Store._context`, `Func._func`, `Memory._memory`, `WasmtimeError._from_ptr`). Those are not a
stable interface, so importing this module checks that the installed wasmtime is the version
sluice is pinned to (`WASMTIME_VERSION`) and refuses to run on any other. wasmtime-py's high-level `Func.__call__`
costs ~25 µs per call into wasm and its host-function trampoline ~8 µs per call out; the unchecked
API used here costs ~1.5 µs and ~0.3 µs because nothing is boxed: arguments and results travel in
one preallocated array of 16-byte `wasmtime_val_raw_t` slots packed with `struct`.

Layers (wasmtime-py itself wraps the C API the same way):

* `engine()`: one engine per process with epoch interruption, and a native ticker (one thread of
  the compiled `_ticker`, else a POSIX timer) that advances the epoch, so every call into wasm
  gets a wall-clock deadline.
* `HostFunction` / `define_host_functions`: host functions defined once on a `Linker`; each
  dispatches to the *active* instance's Python implementation (`ACTIVE[-1]`), so instantiating a
  VM does not create any new ctypes callbacks.
* `WasmFunction`: a callable for one exported function of one instance.
* `LinearMemory`: bounds-checked reads and writes of an instance's memory without copies of the
  whole memory; relies on `memory_may_move = False` so the base address is stable.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import functools
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from time import monotonic as _monotonic
from typing import Any, Protocol

import wasmtime

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

# The raw entry points, re-bound with our own (cheaper) argument conventions. `argtypes` stays
# unset on the hot functions so ctypes does no per-argument conversion: every argument we pass
# is already a ctypes object of the right width.
_dll = ffi.dll
# The same library loaded as a PyDLL: its functions keep the GIL (see `engine`).
_pydll = ctypes.PyDLL(_dll._name)
_call_unchecked = _dll._FuncPtr(("wasmtime_func_call_unchecked", _dll))
_call_unchecked.restype = ctypes.c_size_t
_set_epoch_deadline = _dll._FuncPtr(("wasmtime_context_set_epoch_deadline", _dll))
_set_epoch_deadline.restype = None
_memory_data = _dll._FuncPtr(("wasmtime_memory_data", _dll))
_memory_data.restype = ctypes.c_size_t
_memory_data_size = _dll._FuncPtr(("wasmtime_memory_data_size", _dll))
_memory_data_size.restype = ctypes.c_size_t
_increment_epoch = _dll._FuncPtr(("wasmtime_engine_increment_epoch", _dll))
_increment_epoch.restype = None
_define_unchecked = _dll._FuncPtr(("wasmtime_linker_define_func_unchecked", _dll))
_define_unchecked.restype = ctypes.c_void_p
_trap_new = _dll._FuncPtr(("wasmtime_trap_new", _dll))
_trap_new.restype = ctypes.c_size_t
_trap_new.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_trap_code = _dll._FuncPtr(("wasmtime_trap_code", _dll))
_trap_code.restype = ctypes.c_bool
_trap_code.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8)]
_error_exit_status = _dll._FuncPtr(("wasmtime_error_exit_status", _dll))
_error_exit_status.restype = ctypes.c_bool
_error_exit_status.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
_TRAP_CODE_INTERRUPT = int(ffi.wasmtime_trap_code_enum.WASMTIME_TRAP_CODE_INTERRUPT.value)

# (env, caller, args_and_results, len) -> wasm_trap_t* (0 = no trap)
_HOST_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t)
_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

_SLOT = 16  # sizeof(wasmtime_val_raw_t)

# Value kinds in signatures: i = i32 (signed), I = i32 read as unsigned, q = i64, Q = i64 unsigned,
# f = f32, d = f64.
_WASM_TYPE = {"i": wasmtime.ValType.i32(), "I": wasmtime.ValType.i32(), "q": wasmtime.ValType.i64(),
              "Q": wasmtime.ValType.i64(), "f": wasmtime.ValType.f32(), "d": wasmtime.ValType.f64()}
_PACK = {"i": "i12x", "I": "I12x", "q": "q8x", "Q": "Q8x", "f": "f12x", "d": "d8x"}


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


def _signature_format(kinds: str) -> struct.Struct:
    return struct.Struct("<" + "".join(_PACK[k] for k in kinds))


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
    global _ENGINE, _call_unchecked
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
                _call_unchecked = raw_function("wasmtime_func_call_unchecked", ctypes.c_size_t, keep_gil=True)
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


# The arguments of a host call sit in an array wasmtime owns, at an address that changes per call.
# One view over the whole user address space reads them with `struct.unpack_from` and writes the
# result with `pack_into`, creating no ctypes object per call (~0.25 µs saved per host call). Only
# addresses wasmtime hands us are ever touched through it.
_ADDRESS_SPACE = memoryview((ctypes.c_ubyte * (1 << 47)).from_address(0))
_RESULT = {"i": struct.Struct("<i"), "I": struct.Struct("<I"), "q": struct.Struct("<q"),
           "Q": struct.Struct("<Q"), "f": struct.Struct("<f"), "d": struct.Struct("<d")}


def _trampoline(index: int, fn: HostFunction) -> Any:
    fmt = _signature_format(fn.params)
    unpack_from = fmt.unpack_from
    has_args = fmt.size > 0
    write = _RESULT[fn.results].pack_into if fn.results else None
    space = _ADDRESS_SPACE
    active = ACTIVE
    label = f"{fn.module}.{fn.name}"

    def callback(_env: int, _caller: int, args: int, _nargs: int) -> int:
        try:
            vals = unpack_from(space, args) if has_args else ()
            result = active[-1].host_impls[index](*vals)
            if write is not None:
                write(space, args, result)
            return 0
        except HostTrap as exc:
            if exc.exit_code is not None:
                _EXIT_STATUS[0] = exc.exit_code
            msg = str(exc).encode()
            return int(_trap_new(msg, len(msg)))
        except BaseException as exc:  # noqa: BLE001 - nothing may unwind through wasm frames
            msg = f"host function {label} failed: {type(exc).__name__}: {exc}".encode()
            return int(_trap_new(msg, len(msg)))

    return _HOST_CALLBACK(callback)


_NO_FINALIZER = _FINALIZER()  # a NULL function pointer: nothing to finalize

_CALLBACKS: dict[tuple[HostFunction, int | float | None], tuple[Any, wasmtime.FuncType]] = {}
"""One ctypes callback and function type per definition, kept for the life of the process and
shared by every linker that defines it. Key: (definition, its index in a table) for host
functions, (definition, the constant) for constant functions."""


def _define(linker: wasmtime.Linker, fn: HostFunction, key: int | float | None, make: Callable[[], Any]) -> None:
    entry = _CALLBACKS.get((fn, key))
    if entry is None:
        ty = wasmtime.FuncType([_WASM_TYPE[k] for k in fn.params], [_WASM_TYPE[k] for k in fn.results])
        entry = _CALLBACKS[(fn, key)] = (make(), ty)
    cb, ty = entry
    mod = fn.module.encode()
    name = fn.name.encode()
    err = _define_unchecked(
        ctypes.c_void_p(ctypes.cast(linker.ptr(), ctypes.c_void_p).value),
        ctypes.c_char_p(mod), ctypes.c_size_t(len(mod)),
        ctypes.c_char_p(name), ctypes.c_size_t(len(name)),
        ctypes.c_void_p(ctypes.cast(ty.ptr(), ctypes.c_void_p).value),
        cb, ctypes.c_void_p(0), _NO_FINALIZER,
    )
    if err:
        raise wasmtime_error(err)


def define_host_functions(linker: wasmtime.Linker, functions: Sequence[HostFunction]) -> None:
    """Define `functions` on `linker`; function i dispatches to `ACTIVE[-1].host_impls[i]`.

    Callbacks are made once per definition, so defining the same table on another linker (for
    a module with stubbed imports, see `define_constant_functions`) creates no ctypes objects.
    """
    for index, fn in enumerate(functions):
        _define(linker, fn, index, functools.partial(_trampoline, index, fn))


def _constant_trampoline(fn: HostFunction, value: int | float) -> Any:
    write = _RESULT[fn.results].pack_into if fn.results else None
    space = _ADDRESS_SPACE
    result = float(value) if fn.results in ("f", "d") else int(value)

    def callback(_env: int, _caller: int, args: int, _nargs: int) -> int:
        if write is not None:
            write(space, args, result)
        return 0

    return _HOST_CALLBACK(callback)


def define_constant_functions(linker: wasmtime.Linker, functions: Sequence[tuple[HostFunction, int | float]]) -> None:
    """Define each function as one that ignores its arguments and returns the constant (for
    imports the host does not implement). Needs no active instance: it touches no memory."""
    for fn, value in functions:
        _define(linker, fn, value if fn.results else None, functools.partial(_constant_trampoline, fn, value))


def import_signature(ty: wasmtime.FuncType) -> tuple[str, str]:
    """Kinds string of an imported function type (at most one result), or raise ValueError."""
    params, results = _signature(ty, _IMPORT_KINDS)
    if len(results) > 1:
        raise ValueError("more than one result")
    return params, results


# -- calls into wasm -------------------------------------------------------------------------


def _context_ptr(store: wasmtime.Store) -> ctypes.c_void_p:
    return ctypes.c_void_p(ctypes.cast(store._context(), ctypes.c_void_p).value)


class StoreHandle:
    """The raw context of one store, and its per-call epoch deadline."""

    __slots__ = ("store", "ctx", "_ticks", "_armed_at")

    def __init__(self, store: wasmtime.Store, deadline_ms: float) -> None:
        self.store = store
        self.ctx = _context_ptr(store)
        # One tick more than the deadline needs, so that a deadline armed less than a tick ago
        # still leaves every callback its full budget (see arm_deadline).
        self._ticks = ctypes.c_uint64(deadline_ticks(deadline_ms) + 1)
        self._armed_at = -1.0

    def arm_deadline(self) -> None:
        """Give the next call into wasm its CPU deadline.

        Callbacks come in bursts (a request runs several in a row), so re-arming is skipped when
        the deadline was armed less than one epoch tick ago: at most one tick has passed since,
        and the extra tick in `_ticks` covers it.
        """
        now = _monotonic()
        if now - self._armed_at < EPOCH_TICK_S:
            return
        self._armed_at = now
        _set_epoch_deadline(self.ctx, self._ticks)

    def arm_deadline_ms(self, deadline_ms: float) -> None:
        self._armed_at = -1.0
        _set_epoch_deadline(self.ctx, ctypes.c_uint64(deadline_ticks(deadline_ms)))


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


class WasmFunction:
    """One exported function of one instance, callable with plain ints."""

    __slots__ = ("name", "params", "results", "_handle", "_func", "_func_ref", "_buf", "_view", "_n",
                 "_pack", "_trap", "_trap_ref", "_result")

    def __init__(self, handle: StoreHandle, name: str, func: wasmtime.Func, params: str, results: str) -> None:
        self.name = name
        self.params = params
        self.results = results
        self._handle = handle
        self._func = func._func  # the wasmtime_func_t struct; kept alive by this object
        self._func_ref = ctypes.byref(self._func)
        n = max(len(params), len(results), 1)
        self._buf = (ctypes.c_ubyte * (_SLOT * n))()
        self._view = memoryview(self._buf).cast("B")
        self._n = ctypes.c_size_t(n)
        self._pack = _signature_format(params).pack_into
        self._trap = ctypes.c_void_p(0)
        self._trap_ref = ctypes.byref(self._trap)
        self._result = _signature_format(results).unpack_from if results else None

    def __call__(self, *args: int) -> Any:
        """Call with the epoch deadline already armed by the caller (`StoreHandle.arm_deadline`)."""
        self._pack(self._view, 0, *args)
        err = _call_unchecked(self._handle.ctx, self._func_ref, self._buf, self._n, self._trap_ref)
        if err or self._trap.value:
            trap = self._trap.value or 0
            self._trap.value = 0
            _raise_call_failure(err, trap)
        if self._result is None:
            return None
        return self._result(self._view, 0)[0]


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


class LinearMemory:
    """Bounds-checked access to one instance's memory.

    `memory_may_move = False` (see `_make_engine`) keeps the base address fixed, so one view
    stays valid; it is only widened when an access falls beyond the size last seen (memory never
    shrinks). Every accessor returns None/False instead of raising on an out-of-bounds access, so
    host functions can answer INVALID_MEMORY_ACCESS.
    """

    __slots__ = ("_handle", "_mem", "_mem_ref", "size", "view", "_base")

    def __init__(self, handle: StoreHandle, memory: wasmtime.Memory) -> None:
        self._handle = handle
        self._mem = memory._memory
        self._mem_ref = ctypes.byref(self._mem)
        self.size = 0
        self._base = 0
        self.view = memoryview(b"")
        self.refresh()

    def refresh(self) -> None:
        size = int(_memory_data_size(self._handle.ctx, self._mem_ref))
        if size != self.size:
            self._base = int(_memory_data(self._handle.ctx, self._mem_ref))
            self.size = size
            self.view = memoryview((ctypes.c_ubyte * size).from_address(self._base)).cast("B")

    def fits(self, ptr: int, length: int) -> bool:
        """Whether [ptr, ptr+length) is inside memory, looking again if memory may have grown."""
        end = ptr + length
        if end <= self.size:
            return True
        self.refresh()
        return end <= self.size

    def read(self, ptr: int, length: int) -> bytes | None:
        end = ptr + length
        # The in-bounds test is inlined: this runs several times per host call.
        if end > self.size and not self.fits(ptr, length):
            return None
        if length == 0:
            return b""  # SDKs pass (0, 0) for empty data; a pointer past the end failed above
        return self.view[ptr:end].tobytes()

    def write(self, ptr: int, data: bytes) -> bool:
        end = ptr + len(data)
        if end > self.size and not self.fits(ptr, len(data)):
            return False
        self.view[ptr:end] = data
        return True

    def write_u32(self, ptr: int, value: int) -> bool:
        if not self.fits(ptr, 4):
            return False
        struct.pack_into("<I", self.view, ptr, value & 0xFFFFFFFF)
        return True

    def write_u64(self, ptr: int, value: int) -> bool:
        if not self.fits(ptr, 8):
            return False
        struct.pack_into("<Q", self.view, ptr, value & 0xFFFFFFFFFFFFFFFF)
        return True


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

