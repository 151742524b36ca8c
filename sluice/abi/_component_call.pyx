# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The compiled part of `fastcall_component`: calls into components, and host functions called
by them, with their values lowered and lifted in C instead of through `struct` and Python ints.

What a request costs through the pure-Python path (see bench/bench_component.py) is mostly
Python building and reading 32-byte `wasmtime_component_val_t`s: here a header list is lowered
straight from the `str` objects (their cached UTF-8, borrowed for the call: no encode, no copy),
an action is lifted into the caller's objects in one pass, and a host call costs one C callback
instead of a ctypes trampoline.

Behaviour is the pure-Python path's (`fastcall_component`), which stays as the fallback when
this extension is not built; the tests run both. Like `_ticker`, this links against nothing but
libpython: wasmtime's entry points are handed over as addresses by `fastcall_component`
(`init`), taken from the library wasmtime-py loaded, after `fastcall`'s version check.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint32_t, uintptr_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memset

from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New

from ._component_capi cimport *

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
    void _PyTuple_SET_ITEM "PyTuple_SET_ITEM"(object t, Py_ssize_t i, object v)


cdef inline tuple PyTupleNew(size_t n):
    return PyTuple_New(<Py_ssize_t>n)


cdef inline void PyTupleSet(tuple t, size_t i, object v) noexcept:
    Py_INCREF(v)  # PyTuple_SET_ITEM steals a reference
    _PyTuple_SET_ITEM(t, <Py_ssize_t>i, v)

cdef func_call_fn _func_call = NULL
cdef post_return_fn _post_return = NULL
cdef val_delete_fn _val_delete = NULL
cdef val_clone_fn _val_clone = NULL
cdef error_new_fn _error_new = NULL
cdef add_func_fn _add_func = NULL
cdef object _trap = None
"""fastcall_component._trap: a wasmtime_error_t* (as int) -> the WasmTrap to raise."""
cdef object _to_utf8 = None
"""fastcall_component.to_utf8, for the strings that are not UTF-8 as they are."""


def init(uintptr_t func_call, uintptr_t post_return, uintptr_t val_delete, uintptr_t val_clone,
         uintptr_t error_new, uintptr_t add_func, object trap, object to_utf8) -> None:
    """Hand over wasmtime's entry points (addresses), the error-to-exception function and the
    str-to-UTF-8 rule for strings with lone surrogates."""
    global _func_call, _post_return, _val_delete, _val_clone, _error_new, _add_func, _trap, _to_utf8
    _func_call = <func_call_fn>func_call
    _post_return = <post_return_fn>post_return
    _val_delete = <val_delete_fn>val_delete
    _val_clone = <val_clone_fn>val_clone
    _error_new = <error_new_fn>error_new
    _add_func = <add_func_fn>add_func
    _trap = trap
    _to_utf8 = to_utf8


# -- lifting (results owned by wasmtime, read before they are dropped) -------------------------

cdef str _kind_error(const char* expected, const cval_t* v):
    return f"expected {expected.decode()}, found value kind {v.kind}"


cdef inline str _string(const cval_t* v):
    if v.kind != K_STRING:
        raise ValueError(_kind_error(b"a string", v))
    return PyUnicode_DecodeUTF8(v.of.string.data, <Py_ssize_t>v.of.string.size, NULL)


cdef tuple _strings(const cval_t* v):
    if v.kind != K_LIST:
        raise ValueError(_kind_error(b"a list", v))
    cdef size_t i, n = v.of.list.size
    cdef tuple out = PyTupleNew(n)
    for i in range(n):
        PyTupleSet(out, i, _string(&v.of.list.data[i]))
    return out


cdef tuple _headers(const cval_t* v):
    if v.kind != K_LIST:
        raise ValueError(_kind_error(b"a header list", v))
    cdef size_t i, n = v.of.list.size
    cdef const cval_t* pair
    cdef tuple out = PyTupleNew(n)
    for i in range(n):
        pair = &v.of.list.data[i]
        if (pair.kind != K_TUPLE and pair.kind != K_LIST) or pair.of.list.size != 2:
            raise ValueError(_kind_error(b"a header (tuple of two strings)", pair))
        PyTupleSet(out, i, (_string(&pair.of.list.data[0]), _string(&pair.of.list.data[1])))
    return out


cdef bytes _bytes(const cval_t* v):
    if v.kind != K_LIST:
        raise ValueError(_kind_error(b"a list<u8>", v))
    cdef size_t i, n = v.of.list.size
    cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>n)
    cdef char* dst = PyBytes_AS_STRING(out)
    for i in range(n):
        dst[i] = <char>v.of.list.data[i].of.u8
    return out


cdef inline bint _is(cname_t name, const char* text, size_t size) noexcept:
    return name.size == size and memcmp(name.data, text, size) == 0


cdef const cval_entry_t* _fields(const cval_t* payload, size_t count, const char* case) except NULL:
    if payload == NULL or payload.kind != K_RECORD:
        raise ValueError(f"action {case.decode()} without its record")
    if payload.of.record.size != count:
        raise ValueError(f"action {case.decode()}: {payload.of.record.size} fields, expected {count}")
    return payload.of.record.data


cdef class ActionBuilders:
    """What an `action` variant becomes: `edits(remove, set, add)` (`no_edits` when all three
    are empty), `reply(status, headers, body)`, `callout(cluster, headers, body, timeout_ms)`."""

    cdef object edits, no_edits, reply, callout

    def __init__(self, edits: object, no_edits: object, reply: object, callout: object) -> None:
        self.edits = edits
        self.no_edits = no_edits
        self.reply = reply
        self.callout = callout


cdef object _action(const cval_t* v, ActionBuilders build):
    if v.kind != K_VARIANT:
        raise ValueError(_kind_error(b"a variant", v))
    cdef cname_t case = v.of.variant.discriminant
    cdef const cval_entry_t* f
    cdef tuple remove, set_, add
    if _is(case, b"continue", 8):
        f = _fields(v.of.variant.val, 3, b"continue")
        remove = _strings(&f[0].val)
        set_ = _headers(&f[1].val)
        add = _headers(&f[2].val)
        if not remove and not set_ and not add:
            return build.no_edits
        return build.edits(remove, set_, add)
    if _is(case, b"reply", 5):
        f = _fields(v.of.variant.val, 3, b"reply")
        return build.reply(f[0].val.of.u16, _headers(&f[1].val), _bytes(&f[2].val))
    if _is(case, b"callout", 7):
        f = _fields(v.of.variant.val, 4, b"callout")
        return build.callout(_string(&f[0].val), _headers(&f[1].val), _bytes(&f[2].val), f[3].val.of.u32)
    raise ValueError(f"unknown action {PyUnicode_DecodeUTF8(case.data, <Py_ssize_t>case.size, NULL)!r}")


# -- calls into a component --------------------------------------------------------------------

cdef class Function:
    """One exported function of one component instance with one result (see
    `fastcall_component.ComponentFunction`, the façade)."""

    cdef const void* func
    cdef void* ctx
    cdef bint keep_gil
    cdef object owner
    cdef ActionBuilders build
    cdef cval_t result
    cdef cval_t* vals
    cdef size_t capacity

    def __cinit__(self, uintptr_t func, uintptr_t ctx, bint keep_gil, object owner, ActionBuilders build) -> None:
        """`func`: address of the wasmtime_component_func_t, kept alive by `owner`; `ctx`: the
        store's context. `keep_gil` as in `fastcall_component.ComponentFunction`; `build` makes
        the actions `head` and `action` return."""
        self.func = <const void*>func
        self.ctx = <void*>ctx
        self.keep_gil = keep_gil
        self.owner = owner
        self.build = build
        memset(&self.result, 0, sizeof(cval_t))  # a `bool false`: nothing to drop
        self.vals = NULL
        self.capacity = 0

    def __dealloc__(self) -> None:
        free(self.vals)

    cdef int _reserve(self, size_t count) except -1:
        cdef cval_t* grown
        if count > self.capacity:
            grown = <cval_t*>realloc(self.vals, count * sizeof(cval_t))
            if grown == NULL:
                raise MemoryError()
            self.vals = grown
            self.capacity = count
        return 0

    cdef int _call(self, const cval_t* args, size_t nargs) except -1:
        cdef void* err
        if self.keep_gil:
            err = _func_call(self.func, self.ctx, args, nargs, &self.result, 1)
        else:
            with nogil:
                err = _func_call(self.func, self.ctx, args, nargs, &self.result, 1)
        if err != NULL:
            raise _trap(<uintptr_t>err)
        return 0

    cdef int _finish(self) except -1:
        """Drop the result and let the guest free what it lent (post-return)."""
        cdef void* err
        _val_delete(&self.result)
        memset(&self.result, 0, sizeof(cval_t))
        if self.keep_gil:
            err = _post_return(self.func, self.ctx)
        else:
            with nogil:
                err = _post_return(self.func, self.ctx)
        if err != NULL:
            raise _trap(<uintptr_t>err)
        return 0

    def head(self, list items) -> object:
        """Call with one `list<tuple<string, string>>` argument, `items` (pairs of str); the
        returned action built by `build`. Raises WasmTrap, or ValueError for a malformed result."""
        cdef Py_ssize_t i, n = PyList_GET_SIZE(items)
        cdef Py_ssize_t size
        cdef int j
        cdef object pair, text
        cdef cval_t* vals
        cdef cval_t* tuples
        cdef cval_t* strings
        cdef list keep = None  # what is made here (re-encoded strings, pairs), alive until the call returns
        self._reserve(1 + 3 * n)
        vals = self.vals
        tuples = vals + 1
        strings = vals + 1 + n
        vals[0].kind = K_LIST
        vals[0].of.list.size = n
        vals[0].of.list.data = tuples
        for i in range(n):
            pair = <object>PyList_GET_ITEM(items, i)
            if type(pair) is not tuple or PyTuple_GET_SIZE(pair) != 2:
                pair = tuple(pair)  # any other (name, value) pair, as the pure-Python path takes
                if PyTuple_GET_SIZE(pair) != 2:
                    raise ValueError(f"a header is a (name, value) pair, not {pair!r}")
                if keep is None:
                    keep = []
                keep.append(pair)
            tuples[i].kind = K_TUPLE
            tuples[i].of.list.size = 2
            tuples[i].of.list.data = strings + 2 * i
            for j in range(2):
                text = <object>PyTuple_GET_ITEM(pair, j)
                strings[2 * i + j].kind = K_STRING
                try:
                    strings[2 * i + j].of.string.data = PyUnicode_AsUTF8AndSize(text, &size)
                except UnicodeEncodeError:
                    # Bytes that were not UTF-8 (kept by surrogateescape in HeaderMap) become U+FFFD.
                    text = _to_utf8(text)
                    if keep is None:
                        keep = []
                    keep.append(text)
                    strings[2 * i + j].of.string.data = PyBytes_AS_STRING(text)
                    size = PyBytes_GET_SIZE(text)
                strings[2 * i + j].of.string.size = <size_t>size
        self._call(vals, 1)
        try:
            return _action(&self.result, self.build)
        finally:
            self._finish()

    def action(self, uintptr_t args, size_t nargs) -> object:
        """Call with `nargs` values already packed at address `args`; the action built by `build`."""
        self._call(<const cval_t*>args, nargs)
        try:
            return _action(&self.result, self.build)
        finally:
            self._finish()

    def call(self, uintptr_t args, size_t nargs, object decode) -> object:
        """Call with `nargs` values packed at `args`; `decode(result address)` reads the result."""
        self._call(<const cval_t*>args, nargs)
        try:
            return decode(<uintptr_t>&self.result)
        finally:
            self._finish()


# -- host functions ----------------------------------------------------------------------------
# One C callback per value shape (`fastcall_component.HostShape`); `env` is the (impl, label)
# tuple the shape's implementation was defined with, kept alive in `_DEFINED`.

cdef list _DEFINED = []

cdef char* _VALUE = b"value"
cdef char* _CAS = b"cas"


cdef void* _host_error(object env, BaseException exc) noexcept:
    cdef bytes message
    try:
        message = f"host function {(<tuple>env)[1]} failed: {type(exc).__name__}: {exc}".encode(
            "utf-8", "replace").replace(b"\0", b" ")
        return _error_new(message)
    except BaseException:
        return _error_new(b"host function failed")


cdef inline bytes _key(const cval_t* v):
    if v.kind != K_STRING:
        raise ValueError(_kind_error(b"a string", v))
    return PyBytes_FromStringAndSize(v.of.string.data, <Py_ssize_t>v.of.string.size)


cdef inline uint32_t _u32(const cval_t* v) except? 0xFFFFFFFF:
    if v.kind != K_U32:
        raise ValueError(_kind_error(b"a u32", v))
    return v.of.u32


cdef int _check(size_t nargs, size_t expected, size_t nresults, size_t results) except -1:
    if nargs != expected or nresults != results:
        raise ValueError(f"called with {nargs} arguments and {nresults} results, expected {expected} and {results}")
    return 0


cdef int _status(object answer, cval_t* out) except -1:
    """`result<_, enum>`: ok for None, else err(answer)."""
    cdef cval_t res, err
    cdef bytes case
    memset(&res, 0, sizeof(cval_t))
    res.kind = K_RESULT
    if answer is None:
        res.of.result.is_ok = 1
        res.of.result.val = NULL
    else:
        case = (<str?>answer).encode()
        memset(&err, 0, sizeof(cval_t))
        err.kind = K_ENUM
        err.of.enumeration.size = <size_t>PyBytes_GET_SIZE(case)
        err.of.enumeration.data = PyBytes_AS_STRING(case)
        res.of.result.is_ok = 0
        res.of.result.val = &err
    _val_clone(&res, out)
    return 0


cdef void* _log(void* env, void* ctx, const void* ty, cval_t* args, size_t nargs, cval_t* results,
                size_t nresults) noexcept with gil:
    cdef object e = <object>env
    try:
        _check(nargs, 3, nresults, 0)
        if args[0].kind != K_ENUM:
            raise ValueError(_kind_error(b"an enum", &args[0]))
        (<tuple>e)[0](PyUnicode_DecodeUTF8(args[0].of.enumeration.data, <Py_ssize_t>args[0].of.enumeration.size,
                                           NULL), _string(&args[1]), _string(&args[2]))
        return NULL
    except BaseException as exc:
        return _host_error(e, exc)


cdef void* _get(void* env, void* ctx, const void* ty, cval_t* args, size_t nargs, cval_t* results,
                size_t nresults) noexcept with gil:
    cdef object e = <object>env
    cdef object found
    cdef bytes value
    cdef uint32_t cas
    cdef cval_t res, opt, rec
    cdef cval_entry_t entries[2]
    try:
        _check(nargs, 1, nresults, 1)
        found = (<tuple>e)[0](_key(&args[0]))
        if type(found) is str:
            _status(found, results)
            return NULL
        if found is None:
            memset(&res, 0, sizeof(cval_t))
            memset(&opt, 0, sizeof(cval_t))
            res.kind = K_RESULT
            res.of.result.is_ok = 1
            res.of.result.val = &opt
            opt.kind = K_OPTION
            opt.of.option = NULL
            _val_clone(&res, results)
            return NULL
        value, cas = found
        memset(&res, 0, sizeof(cval_t))
        memset(&opt, 0, sizeof(cval_t))
        memset(&rec, 0, sizeof(cval_t))
        memset(entries, 0, sizeof(entries))
        res.kind = K_RESULT
        res.of.result.is_ok = 1
        res.of.result.val = &opt
        opt.kind = K_OPTION
        opt.of.option = &rec
        rec.kind = K_RECORD
        rec.of.record.size = 2
        rec.of.record.data = entries
        entries[0].name.size = 5
        entries[0].name.data = _VALUE
        entries[0].val.kind = K_STRING
        entries[0].val.of.string.size = <size_t>PyBytes_GET_SIZE(value)
        entries[0].val.of.string.data = PyBytes_AS_STRING(value)
        entries[1].name.size = 3
        entries[1].name.data = _CAS
        entries[1].val.kind = K_U32
        entries[1].val.of.u32 = cas
        _val_clone(&res, results)
        return NULL
    except BaseException as exc:
        return _host_error(e, exc)


cdef void* _set(void* env, void* ctx, const void* ty, cval_t* args, size_t nargs, cval_t* results,
                size_t nresults) noexcept with gil:
    cdef object e = <object>env
    try:
        _check(nargs, 3, nresults, 1)
        _status((<tuple>e)[0](_key(&args[0]), _key(&args[1]), _u32(&args[2])), results)
        return NULL
    except BaseException as exc:
        return _host_error(e, exc)


cdef void* _delete(void* env, void* ctx, const void* ty, cval_t* args, size_t nargs, cval_t* results,
                   size_t nresults) noexcept with gil:
    cdef object e = <object>env
    try:
        _check(nargs, 2, nresults, 1)
        _status((<tuple>e)[0](_key(&args[0]), _u32(&args[1])), results)
        return NULL
    except BaseException as exc:
        return _host_error(e, exc)


cdef host_fn[4] _SHAPES = [_log, _get, _set, _delete]


def define(uintptr_t instance, str name, int shape, object impl, str label) -> int:
    """Define `name` on a linker instance (address) as a function of value shape `shape` (0 log,
    1 entry lookup, 2 set, 3 delete: `fastcall_component.HostShape`) calling `impl`. Returns the
    wasmtime_error_t* (0: defined)."""
    if not 0 <= shape < 4:
        raise ValueError(f"unknown host function shape {shape}")
    cdef tuple env = (impl, label)
    _DEFINED.append(env)
    cdef bytes raw = name.encode()
    return <uintptr_t>_add_func(<void*>instance, raw, <size_t>len(raw), _SHAPES[shape], <void*>env, NULL)


