"""The component half of the fast-call layer: calls into WASI 0.2 components and their host
functions through wasmtime's raw component C API (`wasmtime_component_func_call`,
`wasmtime_component_linker_instance_add_func`), like `fastcall` does for core modules.

This module and `fastcall` are the only ones that touch ctypes or wasmtime-py's private API.

Why not `wasmtime.component.Func.__call__`: it looks the function type up and converts every value
through Python objects on every call (~200 µs for ten headers), and its value conventions cannot
express `result<option<T>, enum>`. Here a value is a 32-byte `wasmtime_component_val_t` (kind
byte, then a 24-byte union) packed with `struct` straight into one buffer:

* arguments are *borrowed* by wasmtime (`Val::from(&c_val)`), so they live in Python-owned memory,
  pointers included, and a whole header list is one `pack_into` with a cached format;
* results are *owned* by wasmtime: read through one view of the address space, then dropped with
  `wasmtime_component_val_delete` (drop in place) and the slot reset to a plain `bool`;
* host-function results are dropped by wasmtime after the callback, so they are built with
  wasmtime's own allocators (`wasm_byte_vec_new`, `wasmtime_component_val_new`, ...).

Only the shapes of the `sluice:filter@0.1.0` world are encoded and decoded (the header list,
the `action` variant, the host functions' `HostShape`s); an unexpected shape raises `ValueError`,
which the caller reports.

The hot paths (a hook with a header list, an action result, host calls) have a compiled twin in
`_component_call` (Cython, optional like `_ticker`), which lowers strings straight from the `str`
objects' UTF-8 and calls wasmtime without ctypes; it is used when it was built (`native()`).
The pure-Python path below stays the fallback, with the same behaviour (the tests run both).
"""

from __future__ import annotations

import ctypes
import enum
import struct
from collections.abc import Callable, Sequence
from itertools import accumulate, chain
from types import ModuleType
from typing import Any

from wasmtime import component as wc

from .fastcall import StoreHandle, WasmTrap, native_ticker, raw_function, summarize_error, wasmtime_error

_native: ModuleType | None
try:
    from . import _component_call

    _native = _component_call
except ImportError:  # not built (no C compiler): the pure-Python path below
    _native = None

# Through `fastcall`, whose import checks the installed wasmtime is the pinned one.
_func_call = raw_function("wasmtime_component_func_call", ctypes.c_void_p)
_post_return = raw_function("wasmtime_component_func_post_return", ctypes.c_void_p)
_gil_func_call = _func_call
_gil_post_return = _post_return
"""The same entry points keeping the GIL (see `keep_gil_if_ticking_natively`)."""
_val_delete = raw_function("wasmtime_component_val_delete", None)
_val_clone = raw_function("wasmtime_component_val_clone", None)
_error_new = raw_function("wasmtime_error_new", ctypes.c_void_p)
_error_new.argtypes = [ctypes.c_char_p]
_add_func = raw_function("wasmtime_component_linker_instance_add_func", ctypes.c_void_p)

# (env, context, func type, args, nargs, results, nresults) -> wasmtime_error_t* (NULL = ok)
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
)
_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_NO_FINALIZER = _FINALIZER()

# Value kinds (wasmtime/component/val.h).
U8, U16, U32, STRING, LIST, RECORD, TUPLE, VARIANT, ENUM, OPTION, RESULT = 2, 4, 6, 12, 13, 14, 15, 16, 17, 18, 19
VAL = struct.Struct("<B7xQQQ")
"""kind, then the union as three words (string/list: size, data; variant: name size, name, payload)."""
_SLOT = VAL.size
_ENTRY = 48  # wasmtime_component_valrecord_entry_t: name (16 bytes), value (32)
_RESULT_VAL = struct.Struct("<B7x?7xQ")  # result: kind, is_ok, payload pointer
_ADDRESS_SPACE = memoryview((ctypes.c_ubyte * (1 << 47)).from_address(0))
"""The whole address space as bytes, read only at addresses wasmtime hands us (as in `fastcall`)."""

def to_utf8(text: str) -> bytes:
    """Strings crossing into a component must be UTF-8: bytes that were not (kept by
    surrogateescape in `HeaderMap`) become U+FFFD, as do other lone surrogates."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace").encode()
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text).encode()


# -- arguments: Python-owned, borrowed by wasmtime ----------------------------------------------


class ArgBuffer:
    """One reusable buffer per instance that arguments are packed into (grows when needed)."""

    __slots__ = ("buf", "view", "base", "pointer", "top")

    def __init__(self, size: int = 16384) -> None:
        self._allocate(size)
        self.top = 0

    def _allocate(self, size: int) -> None:
        self.buf = ctypes.create_string_buffer(size)
        self.view = memoryview(self.buf).cast("B")
        self.base = ctypes.addressof(self.buf)
        self.pointer = ctypes.c_void_p(self.base)

    def reset(self, needed: int) -> None:
        """Start a new argument list that needs at most `needed` bytes."""
        if needed > len(self.view):
            self._allocate(max(needed, 2 * len(self.view)))
        self.top = 0

    def alloc(self, size: int) -> int:
        """Offset of `size` fresh bytes, 8-aligned."""
        at = self.top
        self.top = at + ((size + 7) & ~7)
        return at

    def blob(self, data: bytes) -> int:
        """Copy `data` in; its absolute address."""
        at = self.alloc(len(data))
        self.view[at : at + len(data)] = data
        return self.base + at

    def val(self, at: int, kind: int, a: int = 0, b: int = 0, c: int = 0) -> None:
        VAL.pack_into(self.view, at, kind, a, b, c)

    def string(self, at: int, data: bytes) -> None:
        self.val(at, STRING, len(data), self.blob(data))

    def headers(self, at: int, items: Sequence[tuple[str, str]]) -> None:
        """`list<tuple<string, string>>` at offset `at`: one pack_into for the whole tree.

        Call `reset(headers_size(items))` first. ASCII heads (the usual case) are encoded with
        one `encode` for all names and values together.
        """
        n = len(items)
        tuples = self.alloc(_SLOT * n)
        strings = self.alloc(_SLOT * 2 * n)
        flat = list(chain.from_iterable(items))
        text = "".join(flat)
        blob = text.encode("utf-8", "surrogatepass")  # checked below: only ASCII is kept
        if len(blob) == len(text):
            lens = list(map(len, flat))
        else:
            raw = [to_utf8(x) for x in flat]
            blob = b"".join(raw)
            lens = list(map(len, raw))
        addr = self.blob(blob) if blob else self.base
        base = self.base
        VAL.pack_into(self.view, at, LIST, n, base + tuples, 0)
        if not n:
            return
        key = (n, base + strings)
        values = _TUPLES.get(key)
        if values is None:
            if len(_TUPLES) > 256:
                _TUPLES.clear()
            values = _TUPLES[key] = [v for i in range(n) for v in (TUPLE, 2, base + strings + 64 * i, 0)]
        string_values = [STRING, 0, 0, 0] * (2 * n)
        string_values[1::4] = lens
        string_values[2::4] = accumulate(lens[:-1], initial=addr)
        _vals_format(3 * n).pack_into(self.view, tuples, *values, *string_values)

    def bytes_list(self, at: int, data: bytes) -> None:
        """`list<u8>`: one 32-byte value per byte (the C API has no cheaper form)."""
        n = len(data)
        items = self.alloc(_SLOT * n)
        self.val(at, LIST, n, self.base + items)
        fmt = _vals_format(n)
        values: list[int] = []
        for byte in data:
            values += (U8, byte, 0, 0)
        if n:
            fmt.pack_into(self.view, items, *values)

    def record(self, at: int, fields: Sequence[str]) -> list[int]:
        """A record value at `at`; returns the offsets where each field's value must be written."""
        entries = self.alloc(_ENTRY * len(fields))
        self.val(at, RECORD, len(fields), self.base + entries)
        offsets = []
        for i, name in enumerate(fields):
            raw = name.encode()
            struct.pack_into("<QQ", self.view, entries + _ENTRY * i, len(raw), self.blob(raw))
            offsets.append(entries + _ENTRY * i + 16)
        return offsets


_FORMATS: dict[int, struct.Struct] = {}
_TUPLES: dict[tuple[int, int], list[int]] = {}
"""The tuple values of a header list of n pairs whose strings start at an address: these only
change when an argument buffer moves, so they are built once."""


def _vals_format(count: int) -> struct.Struct:
    fmt = _FORMATS.get(count)
    if fmt is None:
        fmt = _FORMATS[count] = struct.Struct("<" + "B7xQQQ" * count)
    return fmt


def headers_size(items: Sequence[tuple[str, str]]) -> int:
    """Upper bound of the bytes `ArgBuffer.headers` uses for `items` (4 UTF-8 bytes a character,
    for those beyond the BMP)."""
    return _SLOT * (1 + 3 * len(items)) + 4 * sum(len(n) + len(v) for n, v in items) + 16


# -- results: owned by wasmtime, read then dropped ---------------------------------------------


def read_val(addr: int) -> tuple[int, int, int, int]:
    kind, a, b, c = VAL.unpack_from(_ADDRESS_SPACE, addr)
    return kind, a, b, c


def read_string(addr: int) -> str:
    kind, size, data, _ = VAL.unpack_from(_ADDRESS_SPACE, addr)
    if kind != STRING:
        raise ValueError(f"expected a string, found value kind {kind}")
    return _ADDRESS_SPACE[data : data + size].tobytes().decode()


def read_name(size: int, data: int) -> str:
    return _ADDRESS_SPACE[data : data + size].tobytes().decode()


def read_list(addr: int) -> list[int]:
    """Addresses of a list's (or tuple's) elements."""
    kind, size, data, _ = VAL.unpack_from(_ADDRESS_SPACE, addr)
    if kind not in (LIST, TUPLE):
        raise ValueError(f"expected a list, found value kind {kind}")
    return [data + _SLOT * i for i in range(size)]


def list_size(addr: int) -> int:
    kind, size, _, _ = VAL.unpack_from(_ADDRESS_SPACE, addr)
    if kind != LIST:
        raise ValueError(f"expected a list, found value kind {kind}")
    return int(size)


def read_headers(addr: int) -> list[tuple[str, str]]:
    kind, size, data, _ = VAL.unpack_from(_ADDRESS_SPACE, addr)
    if kind != LIST:
        raise ValueError(f"expected a header list, found value kind {kind}")
    out = []
    space = _ADDRESS_SPACE
    unpack = VAL.unpack_from
    for i in range(size):
        _, _, pair, _ = unpack(space, data + _SLOT * i)
        _, nl, np, _ = unpack(space, pair)
        _, vl, vp, _ = unpack(space, pair + _SLOT)
        out.append((space[np : np + nl].tobytes().decode(), space[vp : vp + vl].tobytes().decode()))
    return out


def read_bytes(addr: int) -> bytes:
    return bytes(VAL.unpack_from(_ADDRESS_SPACE, a)[1] & 0xFF for a in read_list(addr))


def read_record(addr: int) -> list[int]:
    """Addresses of a record's field values, in declaration order."""
    kind, size, data, _ = VAL.unpack_from(_ADDRESS_SPACE, addr)
    if kind != RECORD:
        raise ValueError(f"expected a record, found value kind {kind}")
    return [data + _ENTRY * i + 16 for i in range(size)]


def read_variant(addr: int) -> tuple[str, int]:
    """Case name and payload address (0 without payload) of a variant."""
    kind, size, name, payload = VAL.unpack_from(_ADDRESS_SPACE, addr)
    if kind != VARIANT:
        raise ValueError(f"expected a variant, found value kind {kind}")
    return read_name(size, name), payload


def read_result(addr: int) -> tuple[bool, int]:
    kind, ok, payload = _RESULT_VAL.unpack_from(_ADDRESS_SPACE, addr)
    if kind != RESULT:
        raise ValueError(f"expected a result, found value kind {kind}")
    return ok, payload


# -- host-function results: allocated by wasmtime ----------------------------------------------


class HostResult:
    """Writes a host function's result: the value is built in a Python-owned scratch buffer with
    borrowed pointers (as arguments are), then deep-copied into wasmtime-owned memory with one
    `wasmtime_component_val_clone`, because wasmtime drops the results after the callback."""

    __slots__ = ("scratch", "entry", "_entry_at")

    def __init__(self) -> None:
        self.scratch = ArgBuffer(4096)
        self.entry = ArgBuffer(4096)
        self._entry_at = 0
        """Base address of `entry` when the entry tree was laid out in it (0: not yet)."""

    def _commit(self, out: int, buffer: ArgBuffer | None = None) -> None:
        src = (buffer or self.scratch).base
        _val_clone(ctypes.c_void_p(src), ctypes.c_void_p(out))

    def ok(self, out: int) -> None:
        """`ok` of a `result<_, E>`."""
        s = self.scratch
        s.reset(_SLOT)
        _RESULT_VAL.pack_into(s.view, 0, RESULT, True, 0)
        self._commit(out)

    def err_enum(self, out: int, case: str) -> None:
        """`err(case)` of a `result<T, enum>`."""
        s = self.scratch
        raw = case.encode()
        s.reset(2 * _SLOT + len(raw) + 8)
        s.alloc(_SLOT)
        payload = s.alloc(_SLOT)
        VAL.pack_into(s.view, payload, ENUM, len(raw), s.blob(raw), 0)
        _RESULT_VAL.pack_into(s.view, 0, RESULT, False, s.base + payload)
        self._commit(out)

    def ok_none(self, out: int) -> None:
        """`ok(none)` of a `result<option<T>, E>`."""
        s = self.scratch
        s.reset(2 * _SLOT)
        _RESULT_VAL.pack_into(s.view, 0, RESULT, True, s.base + _SLOT)
        VAL.pack_into(s.view, _SLOT, OPTION, 0, 0, 0)
        self._commit(out)

    def ok_entry(self, out: int, value: bytes, cas: int) -> None:
        """`ok(some(entry { value, cas }))` of shared-data's `get` (the hot host-call result).

        The tree (result, option, record, two named fields) is laid out once per buffer; a call
        writes only the value's bytes and the two field values.
        """
        s = self.entry
        s.reset(_ENTRY_VALUE + len(value))
        if self._entry_at != s.base:
            self._entry_at = base = s.base
            _RESULT_VAL.pack_into(s.view, 0, RESULT, True, base + _SLOT)
            VAL.pack_into(s.view, _SLOT, OPTION, base + 2 * _SLOT, 0, 0)
            VAL.pack_into(s.view, 2 * _SLOT, RECORD, 2, base + 3 * _SLOT, 0)
            struct.pack_into("<QQ", s.view, 3 * _SLOT, 5, base + _ENTRY_NAMES)
            struct.pack_into("<QQ", s.view, 3 * _SLOT + _ENTRY, 3, base + _ENTRY_NAMES + 8)
            s.view[_ENTRY_NAMES : _ENTRY_NAMES + 11] = b"value\0\0\0cas"
        view = s.view
        view[_ENTRY_VALUE : _ENTRY_VALUE + len(value)] = value
        VAL.pack_into(view, 3 * _SLOT + 16, STRING, len(value), s.base + _ENTRY_VALUE, 0)
        VAL.pack_into(view, 3 * _SLOT + _ENTRY + 16, U32, cas, 0, 0)
        self._commit(out, s)


_ENTRY_NAMES = 3 * _SLOT + 2 * _ENTRY
_ENTRY_VALUE = _ENTRY_NAMES + 16


def host_error(message: str) -> int:
    """A wasmtime_error_t* that makes the calling component trap with `message`."""
    return int(_error_new(message.encode().replace(b"\0", b" ")))


# -- host functions ----------------------------------------------------------------------------


class HostShape(enum.IntEnum):
    """The value shapes of the host functions sluice defines, and what their implementation is
    called with and returns (the numbers are `_component_call.define`'s)."""

    LOG = 0
    """`(enum, string, string)`, no result: `impl(case, a, b)` with three str."""
    GET_ENTRY = 1
    """`(string) -> result<option<record { value: string, cas: u32 }>, enum>`:
    `impl(key: bytes)` returns None (`ok(none)`), `(value: bytes, cas)` or an error case (str)."""
    SET_CAS = 2
    """`(string, string, u32) -> result<_, enum>`: `impl(key, value, cas)` returns None (ok)
    or an error case."""
    DELETE_CAS = 3
    """`(string, u32) -> result<_, enum>`: `impl(key, cas)` returns None or an error case."""


HostImpl = Callable[..., Any]

_KEEPALIVE: list[Any] = []
_HOST_RESULT: list[HostResult] = []
"""The pure-Python path's result builder (made on first use; host calls do not nest)."""


def _expect(nargs: int, expected: int, nresults: int, results: int) -> None:
    if nargs != expected or nresults != results:
        raise ValueError(f"called with {nargs} arguments and {nresults} results, expected {expected} and {results}")


def read_utf8(addr: int) -> bytes:
    """A string value's UTF-8 bytes."""
    kind, size, data, _ = VAL.unpack_from(_ADDRESS_SPACE, addr)
    if kind != STRING:
        raise ValueError(f"expected a string, found value kind {kind}")
    return _ADDRESS_SPACE[data : data + size].tobytes()


def read_u32(addr: int) -> int:
    kind, value, _, _ = VAL.unpack_from(_ADDRESS_SPACE, addr)
    if kind != U32:
        raise ValueError(f"expected a u32, found value kind {kind}")
    return int(value) & 0xFFFFFFFF


def _status(out: HostResult, results: int, answer: str | None) -> None:
    if answer is None:
        out.ok(results)
    else:
        out.err_enum(results, answer)


def _python_host(shape: HostShape, impl: HostImpl) -> Callable[[int, int, int, int], None]:
    """The pure-Python twin of `_component_call`'s callback for `shape`:
    (args, nargs, results, nresults) -> None."""
    if not _HOST_RESULT:
        _HOST_RESULT.append(HostResult())
    out = _HOST_RESULT[0]

    def log(args: int, nargs: int, _results: int, nresults: int) -> None:
        _expect(nargs, 3, nresults, 0)
        kind, size, name, _ = read_val(args)
        if kind != ENUM:
            raise ValueError(f"expected an enum, found value kind {kind}")
        impl(read_name(size, name), read_string(args + _SLOT), read_string(args + 2 * _SLOT))

    def get_entry(args: int, nargs: int, results: int, nresults: int) -> None:
        _expect(nargs, 1, nresults, 1)
        found = impl(read_utf8(args))
        if found is None:
            out.ok_none(results)
        elif isinstance(found, str):
            out.err_enum(results, found)
        else:
            value, cas = found
            out.ok_entry(results, value, cas)

    def set_cas(args: int, nargs: int, results: int, nresults: int) -> None:
        _expect(nargs, 3, nresults, 1)
        _status(out, results, impl(read_utf8(args), read_utf8(args + _SLOT), read_u32(args + 2 * _SLOT)))

    def delete_cas(args: int, nargs: int, results: int, nresults: int) -> None:
        _expect(nargs, 2, nresults, 1)
        _status(out, results, impl(read_utf8(args), read_u32(args + _SLOT)))

    return {HostShape.LOG: log, HostShape.GET_ENTRY: get_entry, HostShape.SET_CAS: set_cas,
            HostShape.DELETE_CAS: delete_cas}[shape]


def define_func(instance: wc.LinkerInstance, name: str, shape: HostShape, impl: HostImpl, label: str) -> None:
    """Define `name` on a linker instance as a function of value shape `shape` calling `impl`;
    exceptions from `impl` (and arguments of another shape) trap the calling guest."""
    address = ctypes.cast(instance.ptr(), ctypes.c_void_p).value or 0
    if _native is not None:
        err = _native.define(address, name, int(shape), impl, label)
        if err:
            raise wasmtime_error(err)
        return
    run = _python_host(shape, impl)

    def callback(_env: int, _ctx: int, _ty: int, args: int, nargs: int, results: int, nresults: int) -> int:
        try:
            run(args or 0, nargs, results or 0, nresults)
            return 0
        except BaseException as exc:  # noqa: BLE001 - nothing may unwind through wasm frames
            return host_error(f"host function {label} failed: {type(exc).__name__}: {exc}")

    cb = _CALLBACK(callback)
    _KEEPALIVE.append(cb)
    raw = name.encode()
    err = _add_func(
        ctypes.c_void_p(address), ctypes.c_char_p(raw), ctypes.c_size_t(len(raw)), cb, ctypes.c_void_p(0),
        _NO_FINALIZER,
    )
    if err:
        raise wasmtime_error(err)


def native() -> bool:
    """Whether the compiled `_component_call` is used (it was built and not switched off)."""
    return _native is not None


# -- actions -----------------------------------------------------------------------------------


class ActionBuilders:
    """What an `action` variant becomes (the caller's types, given once):
    `edits(remove, set, add)` (`no_edits` when all three are empty), `reply(status, headers,
    body)`, `callout(cluster, headers, body, timeout_ms)`; headers are tuples of (str, str)."""

    __slots__ = ("edits", "no_edits", "reply", "callout", "native")

    def __init__(
        self, edits: Callable[..., Any], no_edits: Any, reply: Callable[..., Any], callout: Callable[..., Any]
    ) -> None:
        self.edits = edits
        self.no_edits = no_edits
        self.reply = reply
        self.callout = callout
        self.native = _native.ActionBuilders(edits, no_edits, reply, callout) if _native is not None else None


def decode_action(addr: int, build: ActionBuilders) -> Any:
    """The pure-Python twin of `_component_call`'s action lifting."""
    case, payload = read_variant(addr)
    if case not in _ACTION_FIELDS:
        raise ValueError(f"unknown action {case!r}")
    if not payload:
        raise ValueError(f"action {case} without its record")
    fields = read_record(payload)
    if len(fields) != _ACTION_FIELDS[case]:
        raise ValueError(f"action {case}: {len(fields)} fields, expected {_ACTION_FIELDS[case]}")
    if case == "continue":
        remove_at, set_at, add_at = fields
        remove = tuple(read_string(a) for a in read_list(remove_at)) if list_size(remove_at) else ()
        set_ = tuple(read_headers(set_at)) if list_size(set_at) else ()
        add = tuple(read_headers(add_at)) if list_size(add_at) else ()
        return build.edits(remove, set_, add) if remove or set_ or add else build.no_edits
    if case == "reply":
        status = read_val(fields[0])[1] & 0xFFFF
        return build.reply(status, tuple(read_headers(fields[1])), read_bytes(fields[2]))
    return build.callout(
        read_string(fields[0]), tuple(read_headers(fields[1])), read_bytes(fields[2]),
        read_val(fields[3])[1] & 0xFFFFFFFF,
    )


_ACTION_FIELDS = {"continue": 3, "reply": 3, "callout": 4}


# -- calls into a component --------------------------------------------------------------------


class ComponentFunction:
    """One exported function of one component instance with one (owned) result value."""

    __slots__ = ("name", "_handle", "_func", "_func_ref", "_results", "_results_addr", "_results_ptr",
                 "_results_view", "_call", "_post", "_native", "_build", "head", "action")

    def __init__(
        self, handle: StoreHandle, name: str, func: wc.Func, *, keep_gil: bool, build: ActionBuilders
    ) -> None:
        """`keep_gil` only for components without WASI imports: wasmtime's WASI runs work on
        threads of its own, and a Python callback there (wasmtime-py's custom stdout was one)
        would deadlock on the GIL. sluice now installs none, but stays conservative.
        `build` makes the actions `head` and `action` return."""
        self.name = name
        self._call = _gil_func_call if keep_gil else _func_call
        self._post = _gil_post_return if keep_gil else _post_return
        self._handle = handle
        self._func = func._func  # the wasmtime_component_func_t struct, kept alive here
        self._func_ref = ctypes.byref(self._func)
        self._results = ctypes.create_string_buffer(_SLOT)  # a `bool false`: nothing to drop
        self._results_addr = ctypes.addressof(self._results)
        self._results_ptr = ctypes.c_void_p(self._results_addr)
        self._results_view = memoryview(self._results).cast("B")
        self._build = build
        self._native: Any = None
        self.head: Callable[[list[tuple[str, str]]], Any] = self._head
        """Call with one header list; the action the result is, built by `build`."""
        self.action: Callable[[ArgBuffer, int], Any] = self._action
        """Call with `nargs` values packed at the start of `args`; the action, built by `build`."""
        if _native is not None:
            # The same GIL rule as the ctypes entry points (see keep_gil_if_ticking_natively).
            self._native = fast = _native.Function(
                ctypes.addressof(self._func), handle.ctx.value or 0, keep_gil and native_ticker(), self._func,
                build.native,
            )
            self.head = fast.head
            self.action = lambda args, nargs: fast.action(args.base, nargs)

    def call(self, args: ArgBuffer, nargs: int, decode: Callable[[int], Any]) -> Any:
        """Call with `nargs` values packed at the start of `args`; `decode` reads the result.

        Raises WasmTrap for traps, deadlines and host-function failures; ValueError (from
        `decode`) for a result of an unexpected shape.
        """
        if self._native is not None:
            return self._native.call(args.base, nargs, decode)
        err = self._call(self._func_ref, self._handle.ctx, args.pointer, _COUNTS[nargs], self._results_ptr, _ONE)
        if err:
            raise _trap(int(err))
        try:
            return decode(self._results_addr)
        finally:
            _val_delete(self._results_ptr)
            self._results_view[:_SLOT] = _NO_VALUE  # back to `bool false`: nothing to drop
            err = self._post(self._func_ref, self._handle.ctx)
            if err:
                raise _trap(int(err))

    def _head(self, items: list[tuple[str, str]]) -> Any:
        args = _HEAD_ARGS
        args.reset(headers_size(items))
        args.alloc(_SLOT)
        args.headers(0, items)
        return self._action(args, 1)

    def _action(self, args: ArgBuffer, nargs: int) -> Any:
        build = self._build
        return self.call(args, nargs, lambda addr: decode_action(addr, build))


_HEAD_ARGS = ArgBuffer()
"""The pure-Python path's argument buffer for header lists (a call does not nest in another)."""


_COUNTS = [ctypes.c_size_t(i) for i in range(8)]
_ONE = _COUNTS[1]
_NO_VALUE = bytes(_SLOT)


def keep_gil_if_ticking_natively() -> None:
    """Let calls into components without WASI imports keep the GIL when `fastcall` found the
    native epoch ticker (its own calls then keep the GIL too): that saves a release and
    re-acquire per call and per host call (~20% of a request). With the thread ticker the GIL
    must be released, or a runaway guest could never be interrupted. Call after
    `fastcall.engine()`."""
    global _gil_func_call, _gil_post_return
    if not native_ticker():
        return
    _gil_func_call = raw_function("wasmtime_component_func_call", ctypes.c_void_p, keep_gil=True)
    _gil_post_return = raw_function("wasmtime_component_func_post_return", ctypes.c_void_p, keep_gil=True)


def _trap(err: int) -> WasmTrap:
    text = summarize_error(str(wasmtime_error(err)))
    deadline = text.endswith("interrupt") or "wasm trap: interrupt" in text
    return WasmTrap("cpu deadline exceeded" if deadline else text, deadline=deadline)


def _address(fn: Any) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


if _native is not None:
    _native.init(
        _address(_func_call), _address(_post_return), _address(_val_delete), _address(_val_clone),
        _address(_error_new), _address(_add_func), _trap, to_utf8,
    )
