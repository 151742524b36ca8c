# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The compiled half of the fast-call layer: calls into wasm, host-function trampolines, linear
memory and the epoch deadline, in C.

`sluice.abi.fastcall` is the one façade the rest of sluice imports; it hands this module the
addresses of wasmtime's C entry points (`init`) and subclasses its types to take wasmtime-py
objects. Here nothing is boxed but what Python must see: a call into wasm packs its int
arguments straight into one preallocated `wasmtime_val_raw_t` array and calls
`wasmtime_func_call_unchecked`; a host function is registered with
`wasmtime_linker_define_func_unchecked` and its C trampoline calls the Python implementation with
plain ints by vectorcall, with no ctypes thunk or argument tuple; linear memory is read and
written through its data pointer.

What each call *means* stays in Python (`vm`, `hostcalls`); the classification of a failed call
too (`fastcall._raise_call_failure`), so traps read exactly as before.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport Py_INCREF, PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clock, timespec* now)
    int CLOCK_MONOTONIC


cdef inline double _monotonic() noexcept nogil:
    """time.perf_counter()'s clock on Linux, in seconds."""
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9

from ._wasmtime cimport (
    wasm_functype_t,
    wasm_trap_t,
    wasmtime_caller_t,
    wasmtime_context_set_epoch_deadline_fn,
    wasmtime_context_t,
    wasmtime_error_t,
    wasmtime_finalizer_t,
    wasmtime_func_call_unchecked_fn,
    wasmtime_func_t,
    wasmtime_linker_define_func_unchecked_fn,
    wasmtime_linker_t,
    wasmtime_memory_data_fn,
    wasmtime_memory_data_size_fn,
    wasmtime_memory_t,
    wasmtime_trap_new_fn,
    wasmtime_val_raw_t,
)

cdef extern from "Python.h":
    # Raw references, so the trampoline builds its argument array without a tuple.
    object _vectorcall "PyObject_Vectorcall"(object callable, PyObject** args, size_t nargsf, PyObject* kwnames)
    long long PyLong_AsLongLongAndOverflow(object value, int* overflow) except? -1
    unsigned long long PyLong_AsUnsignedLongLong(object value) except? -1
    PyObject* PyLong_FromLong(long v)
    PyObject* PyLong_FromUnsignedLong(unsigned long v)
    PyObject* PyLong_FromLongLong(long long v)
    PyObject* PyLong_FromUnsignedLongLong(unsigned long long v)
    PyObject* PyFloat_FromDouble(double v)
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    object PyUnicode_AsEncodedString(object text, const char* encoding, const char* errors)
    void _decref "Py_DECREF"(PyObject* o)
    int PyGC_Enable()
    int PyGC_Disable()
    void _set_size "Py_SET_SIZE"(object o, Py_ssize_t size)
    bint PyUnicode_IS_ASCII(object text)
    void* PyUnicode_DATA(object text)
    Py_ssize_t PyUnicode_GET_LENGTH(object text)

cdef enum:
    MAX_SLOTS = 16  # more parameters than any host function or callback sluice defines

cdef wasmtime_func_call_unchecked_fn _call_unchecked = NULL
cdef wasmtime_context_set_epoch_deadline_fn _set_deadline = NULL
cdef wasmtime_memory_data_fn _memory_data = NULL
cdef wasmtime_memory_data_size_fn _memory_data_size = NULL
cdef wasmtime_trap_new_fn _trap_new = NULL
cdef wasmtime_linker_define_func_unchecked_fn _define_unchecked = NULL
cdef bint _keep_gil = False
cdef list _active = None
cdef object _call_failure = None
cdef object _host_failure = None
cdef object _trap_type = None
cdef bytes _host_failed = b"host function failed"


def init(uintptr_t call_unchecked, uintptr_t set_epoch_deadline, uintptr_t memory_data,
         uintptr_t memory_data_size, uintptr_t trap_new, uintptr_t define_func_unchecked,
         list active, call_failure, host_failure, trap_type):
    """Bind the C entry points (addresses from the loaded wasmtime library) and the Python side:
    `active` is the stack of instances host calls dispatch to (`fastcall.ACTIVE`),
    `call_failure(err, trap)` raises the WasmTrap for a failed call, `host_failure(label, exc)`
    returns the trap message for a host function that raised, `trap_type` is `WasmTrap`."""
    global _call_unchecked, _set_deadline, _memory_data, _memory_data_size, _trap_new, _define_unchecked
    global _active, _call_failure, _host_failure, _trap_type
    _call_unchecked = <wasmtime_func_call_unchecked_fn><void*>call_unchecked
    _set_deadline = <wasmtime_context_set_epoch_deadline_fn><void*>set_epoch_deadline
    _memory_data = <wasmtime_memory_data_fn><void*>memory_data
    _memory_data_size = <wasmtime_memory_data_size_fn><void*>memory_data_size
    _trap_new = <wasmtime_trap_new_fn><void*>trap_new
    _define_unchecked = <wasmtime_linker_define_func_unchecked_fn><void*>define_func_unchecked
    _active = active
    _call_failure = call_failure
    _host_failure = host_failure
    _trap_type = trap_type


def struct_sizes():
    """sizeof wasmtime_func_t, wasmtime_memory_t, wasmtime_val_raw_t as compiled here (checked
    against wasmtime-py's own declarations by `fastcall`, so a layout change cannot go unseen)."""
    return (sizeof(wasmtime_func_t), sizeof(wasmtime_memory_t), sizeof(wasmtime_val_raw_t))


def keep_gil(bint keep):
    """Whether calls into wasm keep the GIL: only when the epoch advances without Python."""
    global _keep_gil
    _keep_gil = keep


# -- values ----------------------------------------------------------------------------------
# Kinds: i = i32 (signed), I = i32 read as unsigned, q = i64, Q = i64 unsigned, f = f32, d = f64.

cdef int _store(wasmtime_val_raw_t* slot, char kind, object value) except -1:
    """One Python number into a slot. Ints wrap to the slot's width (wasm integers have no sign)."""
    cdef unsigned long long bits
    cdef int overflow = 0
    if kind == b'f':
        slot.f32 = <float>value
    elif kind == b'd':
        slot.f64 = <double>value
    else:
        # Any int in range of either signedness (u32 and i32 values both occur).
        bits = <unsigned long long>PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow:
            bits = PyLong_AsUnsignedLongLong(value)
        if kind == b'q' or kind == b'Q':
            slot.i64 = <int64_t>bits
        else:
            slot.i32 = <int32_t>(<uint32_t>bits)
    return 0


cdef PyObject* _box(wasmtime_val_raw_t* slot, char kind):
    """A new reference to the Python number in a slot (NULL with an exception set on failure)."""
    if kind == b'I':
        return PyLong_FromUnsignedLong(<uint32_t>slot.i32)
    if kind == b'i':
        return PyLong_FromLong(slot.i32)
    if kind == b'q':
        return PyLong_FromLongLong(slot.i64)
    if kind == b'Q':
        return PyLong_FromUnsignedLongLong(<uint64_t>slot.i64)
    if kind == b'f':
        return PyFloat_FromDouble(slot.f32)
    return PyFloat_FromDouble(slot.f64)


cdef object _unbox(wasmtime_val_raw_t* slot, char kind):
    if kind == b'i':
        return slot.i32
    if kind == b'I':
        return <uint32_t>slot.i32
    if kind == b'q':
        return slot.i64
    if kind == b'Q':
        return <uint64_t>slot.i64
    if kind == b'f':
        return slot.f32
    return slot.f64


cdef int _kinds(char* out, str kinds) except -1:
    cdef bytes raw = kinds.encode("ascii")
    if len(raw) > MAX_SLOTS:
        raise ValueError(f"more than {MAX_SLOTS} values: {kinds!r}")
    for k in raw:
        if k not in b"iIqQfd":
            raise ValueError(f"unknown value kind {chr(k)!r} in {kinds!r}")
    memcpy(out, PyBytes_AS_STRING(raw), len(raw))
    return len(raw)


# -- the epoch deadline -----------------------------------------------------------------------

cdef class Deadline:
    """The raw context of one store and its per-call epoch deadline (`fastcall.StoreHandle`)."""

    cdef wasmtime_context_t* _ctx
    cdef uint64_t _ticks
    cdef readonly uintptr_t address
    """The `wasmtime_context_t*` of the store."""

    def __init__(self, uintptr_t context, uint64_t ticks):
        self._ctx = <wasmtime_context_t*><void*>context
        self.address = context
        self._ticks = ticks

    def arm_deadline(self):
        """Give the next call into wasm the store's full CPU deadline (a native call: cheap
        enough to make before every callback)."""
        _set_deadline(self._ctx, self._ticks)

    def arm_ticks(self, uint64_t ticks):
        """Give the next call into wasm `ticks` epoch ticks (a one-off budget)."""
        _set_deadline(self._ctx, ticks)


# -- calls into wasm --------------------------------------------------------------------------

cdef inline void _pop_keeping_storage(list stack) noexcept:
    """`stack.pop()` without giving the list's storage back: list.pop() frees it when the list
    empties, which every outermost call does (`_active`, a VM's frames above its bottom one), so
    the next call's append would allocate again."""
    cdef Py_ssize_t n = PyList_GET_SIZE(stack)
    cdef PyObject* top
    if n > 0:
        top = PyList_GET_ITEM(stack, n - 1)
        _set_size(stack, n - 1)
        _decref(top)


cdef class CallbackTimes:
    """Callbacks' wall times in seconds against fixed upper bounds (`value <= bound` falls in that
    bound's bucket, as `sluice.histogram.Histogram`), bucketed here as each timed call returns:
    no float object, no list, no fold in Python per callback. `state()` is read by reports."""

    cdef double* _bounds
    cdef long long* _counts
    cdef Py_ssize_t _n
    cdef double _sum
    cdef long long _count
    cdef readonly tuple bounds

    def __cinit__(self, bounds):
        cdef Py_ssize_t i
        self.bounds = tuple(float(b) for b in bounds)
        if any(b >= a for a, b in zip(self.bounds[1:], self.bounds)):
            raise ValueError(f"histogram bounds must ascend: {self.bounds}")
        self._n = len(self.bounds)
        self._bounds = <double*>malloc((self._n + 1) * sizeof(double))
        self._counts = <long long*>calloc(self._n + 1, sizeof(long long))
        if self._bounds == NULL or self._counts == NULL:
            raise MemoryError()
        for i in range(self._n):
            self._bounds[i] = self.bounds[i]

    def __dealloc__(self):
        free(self._bounds)
        free(self._counts)

    cdef inline void record(self, double seconds) noexcept:
        cdef Py_ssize_t lo = 0, hi = self._n, mid
        while lo < hi:  # bisect_left
            mid = (lo + hi) >> 1
            if self._bounds[mid] < seconds:
                lo = mid + 1
            else:
                hi = mid
        self._counts[lo] += 1
        self._sum += seconds
        self._count += 1

    def observe(self, double seconds):
        self.record(seconds)

    def state(self):
        """(bounds, counts per bucket with +Inf last, sum, count) as they are now."""
        return (self.bounds, tuple(self._counts[i] for i in range(self._n + 1)), self._sum, self._count)


cdef class Func:
    """One exported function of one instance, callable with plain numbers; the caller arms the
    epoch deadline first (`Deadline.arm_deadline`)."""

    cdef wasmtime_context_t* _ctx
    cdef wasmtime_func_t _func
    cdef wasmtime_val_raw_t _vals[MAX_SLOTS]
    cdef int _nparams
    cdef int _nslots
    cdef char _kinds[MAX_SLOTS]
    cdef char _result
    cdef readonly str name
    cdef readonly str params
    cdef readonly str results

    def __init__(self, uintptr_t context, uintptr_t func, str name, str params, str results):
        """`func`: the address of a `wasmtime_func_t` (copied: it is a store id and an index)."""
        if len(results) > 1:
            raise ValueError("more than one result")
        self._ctx = <wasmtime_context_t*><void*>context
        memcpy(&self._func, <void*>func, sizeof(wasmtime_func_t))
        memset(self._vals, 0, sizeof(self._vals))
        self._nparams = _kinds(self._kinds, params)
        self._result = 0
        if results:
            _kinds(&self._result, results)
        self._nslots = max(self._nparams, 1)
        self.name = name
        self.params = params
        self.results = results

    def __call__(self, *args):
        return self._call(args)

    def call_in(self, Deadline deadline, object instance, tuple args, object timing=None):
        """Call as the callback of `instance`: arm `deadline` (None: a nested call, which runs
        under its caller's), make `instance` the one host calls dispatch to (`ACTIVE`), and keep
        the cycle collector paused until the call returns (its pause is the host's time, and run
        inside a host call it would count against the filter's CPU deadline). With `timing`,
        a call that returns records its wall time in seconds there (a `CallbackTimes`, or a list
        it is appended to)."""
        return self._call_in(deadline, instance, args, timing)

    cdef object _call_in(self, Deadline deadline, object instance, tuple args, object timing):
        cdef int was_enabled
        cdef double started = 0.0
        cdef object result
        if deadline is not None:
            _set_deadline(deadline._ctx, deadline._ticks)
        _active.append(instance)
        was_enabled = PyGC_Disable()
        try:
            if timing is None:
                return self._call(args)
            started = _monotonic()
            result = self._call(args)
            if isinstance(timing, CallbackTimes):
                (<CallbackTimes>timing).record(_monotonic() - started)
            else:
                timing.append(_monotonic() - started)
            return result
        finally:
            _pop_keeping_storage(_active)
            if was_enabled:
                PyGC_Enable()

    cdef object _call(self, tuple args):
        cdef Py_ssize_t n = len(args)
        cdef int i
        cdef wasmtime_error_t* err
        cdef wasm_trap_t* trap = NULL
        if n != self._nparams:
            raise TypeError(f"{self.name} takes {self._nparams} arguments ({n} given)")
        for i in range(n):
            _store(&self._vals[i], self._kinds[i], args[i])
        if _keep_gil:
            err = _call_unchecked(self._ctx, &self._func, self._vals, self._nslots, &trap)
        else:
            with nogil:
                err = _call_unchecked(self._ctx, &self._func, self._vals, self._nslots, &trap)
        if err != NULL or trap != NULL:
            _call_failure(<uintptr_t>err, <uintptr_t>trap)
            raise AssertionError("call_failure returned")  # it always raises
        if self._result == 0:
            return None
        return _unbox(&self._vals[0], self._result)


# -- callbacks: frames and the calls the VM makes ----------------------------------------------

cdef class Frame:
    """One callback in progress (`vm.WasmVM.frames`): the context it runs for and what it may see."""

    cdef public object context
    cdef public object effective
    """The context set by proxy_set_effective_context, until the callback returns."""
    cdef public bint configuring
    """Inside proxy_on_configure: the plugin configuration buffer is readable."""
    cdef public bint local_reply_sent
    cdef public object foreign_args

    def __init__(self, object context, bint configuring=False):
        self.context = context
        self.effective = None
        self.configuring = configuring
        self.local_reply_sent = False
        self.foreign_args = None


cdef class VMCore:
    """What the compiled calls read and write of one VM (`vm.WasmVM` is its subclass) on every
    callback and host call, as C fields rather than attributes looked up by name."""

    cdef public list frames
    """Callbacks in progress, innermost last (see `vm.WasmVM`)."""
    cdef public Frame _outer_frame
    cdef public list deferred
    cdef public object dead
    cdef public Deadline handle
    cdef public object allocator
    cdef public object nested_trap
    # What every stream on the VM asks on every request, answered once per VM (`vm.WasmVM`).
    cdef public Func request_headers_fn
    cdef public Func response_headers_fn
    cdef public bint request_headers_args3
    cdef public bint response_headers_args3
    cdef public bint reads_request_body
    cdef public bint reads_response_body
    cdef public Func on_context_create
    cdef public tuple end_of_stream
    """What ends a stream context: proxy_on_log, proxy_on_done, proxy_on_delete, those exported."""
    cdef public dict contexts
    """Live contexts (roots and streams) by id."""
    cdef public long long _next_context
    cdef public long long live_streams
    """Streams begun on this VM and not yet complete (counted here, in C, on every stream)."""
    cdef public bint release_when_idle
    """No new stream comes to this VM (replaced, or its plugin retired): once `live_streams`
    drops to 0 its plugin releases it."""
    cdef public Py_ssize_t max_headers
    """The filter's header-map limits (`Limits.max_headers`, `max_header_bytes`), which the
    compiled add and replace host calls hold a map to."""
    cdef public Py_ssize_t max_header_bytes


    def __cinit__(self, *args, **kwargs):
        self.frames = []
        self.deferred = []

    def new_context_id(self):
        """The id of a new context (root or stream) in this VM."""
        return self._new_context_id()

    cdef inline long long _new_context_id(self):
        self._next_context += 1
        return self._next_context


cdef Frame _enter(VMCore vm, object context, bint configuring, bint outermost):
    """Push the frame a call into `vm` runs under: the VM's outermost frame, reused (nothing keeps
    a frame once its call returned, and `_leave` leaves it clean, so only what this call sets is
    set), or a fresh one for a call nested in a host call."""
    cdef Frame frame
    if vm.dead is not None:
        raise _trap_type(f"VM is no longer usable: {vm.dead}")
    if outermost:
        frame = vm._outer_frame
        frame.context = context
        frame.configuring = configuring
        frame.local_reply_sent = False  # (a trapped call leaves it set)
    else:
        frame = Frame(context, configuring)
    vm.frames.append(frame)
    return frame


cdef inline void _leave(VMCore vm, Frame frame, bint outermost) noexcept:
    """Pop `frame`; clean the outermost one: a context kept there would tie the VM to itself (no
    refcount release)."""
    _pop_keeping_storage(vm.frames)
    if outermost:
        frame.context = None
        frame.effective = None
        frame.foreign_args = None
        frame.configuring = False


def invoke(VMCore vm, Func fn, object context, tuple args, bint configuring=False, object deadline_ms=None,
           object timing=None):
    """`WasmVM.invoke` (bound as that method): call `fn` under a frame for `context`, then run
    the deferred actions if it was the outermost call. See `vm.WasmVM.invoke`."""
    return _invoke(vm, fn, context, args, configuring, deadline_ms, timing)


cdef object _invoke(VMCore vm, Func fn, object context, tuple args, bint configuring, object deadline_ms,
                    object timing):
    cdef bint outermost = PyList_GET_SIZE(vm.frames) == 1
    cdef Deadline handle = None  # nested in a host call: runs under its caller's deadline
    cdef Frame frame = _enter(vm, context, configuring, outermost)
    cdef object result
    if outermost:
        if deadline_ms is None:
            handle = vm.handle
        else:
            vm.handle.arm_deadline_ms(deadline_ms)
    try:
        result = fn._call_in(handle, vm, args, timing)
    except BaseException as exc:
        if isinstance(exc, _trap_type):
            raise vm._trapped(exc) from None
        raise
    finally:
        _leave(vm, frame, outermost)
    if frame.local_reply_sent and result is not None:
        result = 1  # a local reply overrides the callback's return value to "stop"
    if outermost and vm.deferred:
        vm.run_deferred()
    return result


def invoke_each(VMCore vm, tuple fns, object context, tuple args):
    """`WasmVM.invoke_each` (bound as that method): several void callbacks in a row for one
    context. See `vm.WasmVM.invoke_each`."""
    _invoke_each(vm, fns, context, args)


cdef object _invoke_each(VMCore vm, tuple fns, object context, tuple args):
    cdef bint outermost = PyList_GET_SIZE(vm.frames) == 1
    cdef Deadline handle = vm.handle if outermost else None
    cdef Frame frame = _enter(vm, context, False, outermost)
    cdef object fn = None
    try:
        for fn in fns:
            frame.effective = None  # each gets a fresh effective context (and, outermost, its full deadline)
            (<Func?>fn)._call_in(handle, vm, args, None)
    except BaseException as exc:
        if isinstance(exc, _trap_type):
            vm.failed_fn = fn
            raise vm._trapped(exc) from None
        raise
    finally:
        _leave(vm, frame, outermost)
    if outermost and vm.deferred:
        vm.run_deferred()


# -- stream contexts --------------------------------------------------------------------------

cdef object _wasm_mode = None
cdef object _continue = None
cdef object _stop = None
cdef object _detached = None


def set_stream_constants(object wasm_mode, object cont, object stop, object detached):
    """`StreamMode.WASM`, `FilterStatus.CONTINUE` and `FilterStatus.STOP`: the members the
    compiled stream callbacks compare with and answer; `common.DETACHED`, the callbacks of a
    stream that has ended."""
    global _wasm_mode, _continue, _stop, _detached
    _wasm_mode, _continue, _stop, _detached = wasm_mode, cont, stop, detached


cdef class StreamCore:
    """One filter's stream (`plugin.HttpStream`, which is also its `vm.StreamContext`): the fields
    its compiled calls read, and the calls made on every request of every filter — the header
    callbacks, and the header lookups of host calls. What is rare is the Python subclass's: the
    context's creation in the VM, a trap, the failure policy, a status other than Continue."""

    cdef public long long id
    """The context id in the VM; 0 until the context is created (at the first callback)."""
    cdef public object root
    cdef public object stream
    """What the context asks of its stream (`vm.StreamActions`): the stream itself."""
    cdef public bint deleted
    cdef public list maps
    """Indexed by MapType 0..3, filled phase by phase."""
    cdef public list bodies
    """Indexed by BufferType 0..1."""
    cdef public bint in_log
    """proxy_on_log (and done/delete) is running: the stream's maps are read-only."""
    cdef public object _plugin
    cdef public VMCore _vm
    cdef public object info
    cdef public object _callbacks
    cdef public object _mode
    cdef public object _timing
    cdef public bint paused
    cdef public bint completed
    cdef public bint reads_request_body
    """This filter's body callbacks run (and so may change the body's length)."""
    cdef public bint reads_response_body

    def __init__(self, object plugin, VMCore vm, object info, object callbacks, object mode):
        self.id = 0
        self.root = None
        self.stream = self
        self.deleted = False
        self.maps = [None, None, None, None]
        self.bodies = [None, None]
        self.in_log = False
        self._plugin = plugin
        self._vm = vm
        self.info = info
        self._callbacks = callbacks
        self._mode = mode
        self._timing = plugin._callback_time
        self.paused = False
        self.completed = False
        # What the module exports is the VM's to know, once.
        if vm is not None:
            vm.live_streams += 1
            if mode is _wasm_mode:
                self.reads_request_body = vm.reads_request_body
                self.reads_response_body = vm.reads_response_body

    # -- header callbacks (Envoy's decodeHeaders / encodeHeaders) --------------------------------
    def request_headers(self, object headers, bint end_of_stream):
        self.maps[0] = headers
        if self._mode is not _wasm_mode:
            return self._entry_status()
        cdef VMCore vm = self._vm
        if vm.request_headers_fn is None:
            return _continue  # not exported: the default
        return self._headers_call(vm, vm.request_headers_fn, vm.request_headers_args3, headers, end_of_stream)

    def response_headers(self, object headers, bint end_of_stream):
        self.maps[2] = headers
        if self._mode is not _wasm_mode:
            return _continue  # a failed filter is skipped on the way back (Envoy)
        cdef VMCore vm = self._vm
        if vm.response_headers_fn is None:
            return _continue
        return self._headers_call(vm, vm.response_headers_fn, vm.response_headers_args3, headers, end_of_stream)

    cdef object _headers_call(self, VMCore vm, Func fn, bint args3, object headers, bint end_of_stream):
        cdef object r = None
        cdef tuple args
        if self.id != 0 or self._create():
            if args3:
                args = (self.id, PyList_GET_SIZE(<list>headers._items), 1 if end_of_stream else 0)
            else:
                args = (self.id, PyList_GET_SIZE(<list>headers._items))
            try:
                r = _invoke(vm, fn, self, args, False, None, self._timing)
            except BaseException as exc:
                if not isinstance(exc, _trap_type):
                    raise
                self._trapped(fn.name, exc)  # the failure policy applies to this stream
                r = None
        # 0 Continue, 2 ContinueAndEndStream; 1, 3, 4 and anything larger stop (cpp-host).
        if (r is None or r == 0 or r == 2) and self._mode is _wasm_mode:
            return _continue
        return self._status(r, (0, 2))

    # -- the context in the VM ------------------------------------------------------------------
    def _create_context(self):
        """Bring the stream context to life in the VM; False when that failed (policy applied)."""
        return self._create()

    cdef bint _create(self) except -1:
        cdef VMCore vm = self._vm
        plugin = self._plugin
        root = plugin._root if vm is plugin._vm else plugin._root_for(vm)
        if root is None:
            self.fail("the filter has no root context")
            return False
        self.root = root
        self.id = vm._new_context_id()
        vm.contexts[self.id] = self
        if vm.on_context_create is not None:
            try:
                _invoke(vm, vm.on_context_create, self, (self.id, root.id), False, None, None)
            except BaseException as exc:
                if not isinstance(exc, _trap_type):
                    raise
                self._trapped("proxy_on_context_create", exc)
                return False
        return True

    def complete(self):
        """proxy_on_log, proxy_on_done, proxy_on_delete (current Envoy order); exactly once."""
        if self.completed:
            return
        self.completed = True
        cdef VMCore vm = self._vm
        cdef bint live
        if vm is None:
            self._callbacks = _detached
            return
        try:
            if self._mode is _wasm_mode and vm.dead is None:
                live = self.id != 0
                if not live and self.maps[0] is not None:
                    live = self._create()  # Envoy: the access-log hook creates it if needed
                if live and self._mode is _wasm_mode and vm.end_of_stream:
                    self.in_log = True
                    try:
                        _invoke_each(vm, vm.end_of_stream, self, (self.id,))
                    except BaseException as exc:
                        if not isinstance(exc, _trap_type):
                            raise
                        failed = vm.failed_fn
                        self._plugin._on_trap(vm, exc, failed.name if failed is not None else "proxy_on_log")
            if self.id != 0 and not self.deleted:
                self.deleted = True
                vm.contexts.pop(self.id, None)
            # Without this every request leaves a reference cycle (the context's `stream` is the
            # stream itself) for the cycle collector, whose pauses show up as tail latency.
            self.stream = None
        finally:
            vm.live_streams -= 1
            if vm.live_streams <= 0 and vm.release_when_idle:
                self._plugin._stream_done(vm)
            # Late events (a callout answer after the stream ended) see `completed` and stop
            # there; nothing reaches the chain's callbacks any more.
            self._callbacks = _detached

    # -- what host calls read (`vm.StreamContext`: the rest of what they mean) -------------------
    def header_map(self, long long mtype, bint write):
        """Map `mtype` if it exists and may be used this way now, else None."""
        return self._header_map(mtype, write)

    cdef inline object _header_map(self, long long mtype, bint write):
        if mtype <= 3:
            if write and self.in_log:
                return None  # Envoy: the access-log phase sees the maps read-only
            return <object>PyList_GET_ITEM(self.maps, mtype)
        return self.root.header_map(mtype, write)

    def get_header_value(self, long long mtype, str key):
        """The value of `key` in map `mtype`; None when the map lacks it."""
        return self._header_value(mtype, key)

    cdef inline object _header_value(self, long long mtype, str key):
        cdef object hmap
        if mtype <= 3:
            hmap = <object>PyList_GET_ITEM(self.maps, mtype)
        else:
            hmap = self.root.header_map(mtype, False)
        if hmap is None:
            # A map this stream never had reads as empty in the log phase (Envoy), else it is an error.
            return None if self.in_log else _BAD_ARGUMENT
        return _header_get(hmap, key)


# -- host functions ---------------------------------------------------------------------------

cdef struct HostDef:
    int index
    int nparams
    char kinds[MAX_SLOTS]
    char result          # 0: no result
    bint constant        # ignore the arguments and answer `value`
    double value_f
    int64_t value_i
    PyObject* label      # bytes "module.name", a reference kept for the life of the process


cdef int _write_result(wasmtime_val_raw_t* slot, char kind, object value) except -1:
    if kind == b'f':
        slot.f32 = <float>value
    elif kind == b'd':
        slot.f64 = <double>value
    else:
        _store(slot, kind, value)
    return 0


cdef int _propagate() except -1:
    return -1  # an exception is already set: make Cython raise it


cdef wasm_trap_t* _trap_for(HostDef* d, object exc) noexcept:
    cdef bytes msg
    try:
        msg = _host_failure(<object>d.label, exc)
    except BaseException:
        msg = _host_failed
    return _trap_new(PyBytes_AS_STRING(msg), PyBytes_GET_SIZE(msg))


cdef wasm_trap_t* _host_call(void* env, wasmtime_caller_t* caller, wasmtime_val_raw_t* vals,
                             size_t nvals) noexcept with gil:
    cdef HostDef* d = <HostDef*>env
    cdef PyObject* argv[MAX_SLOTS]
    cdef int i, made = 0
    cdef Py_ssize_t depth
    cdef object impl, result
    if d.constant:
        if d.result == b'd' or d.result == b'f':
            if d.result == b'd':
                vals[0].f64 = d.value_f
            else:
                vals[0].f32 = <float>d.value_f
        elif d.result == b'q' or d.result == b'Q':
            vals[0].i64 = d.value_i
        elif d.result:
            vals[0].i32 = <int32_t>d.value_i
        return NULL
    try:
        depth = PyList_GET_SIZE(_active)
        if depth == 0:
            raise RuntimeError("no active instance")
        impl = (<object>PyList_GET_ITEM(_active, depth - 1)).host_impls[d.index]
        try:
            for i in range(d.nparams):
                argv[i] = _box(&vals[i], d.kinds[i])
                if argv[i] == NULL:
                    _propagate()
                made += 1
            result = _vectorcall(impl, argv, d.nparams, NULL)
        finally:
            for i in range(made):
                _decref(argv[i])
        if d.result:
            _write_result(&vals[0], d.result, result)
        return NULL
    except BaseException as exc:  # nothing may unwind through wasm frames
        return _trap_for(d, exc)


def host_definition(int index, str params, str results, bytes label, constant=None):
    """A host function's C environment (kept for the life of the process): it dispatches to
    `ACTIVE[-1].host_impls[index]`, or answers `constant` without reading its arguments."""
    cdef HostDef* d = <HostDef*>malloc(sizeof(HostDef))
    if d == NULL:
        raise MemoryError()
    memset(d, 0, sizeof(HostDef))
    d.index = index
    d.nparams = _kinds(d.kinds, params)
    if len(results) > 1:
        raise ValueError("more than one result")
    if results:
        _kinds(&d.result, results)
    if constant is not None:
        d.constant = True
        if d.result == b'd' or d.result == b'f':
            d.value_f = constant
        elif d.result:
            d.value_i = constant
    Py_INCREF(label)  # kept: the definition lives as long as the process
    d.label = <PyObject*>label
    return <uintptr_t>d


def define(uintptr_t linker, bytes module, bytes name, uintptr_t functype, uintptr_t definition):
    """Define `module.name` on a linker as the host function `definition` (from
    `host_definition`); returns the `wasmtime_error_t*` address, 0 on success."""
    cdef wasmtime_error_t* err = _define_unchecked(
        <wasmtime_linker_t*><void*>linker, PyBytes_AS_STRING(module), PyBytes_GET_SIZE(module),
        PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), <const wasm_functype_t*><void*>functype,
        _host_call, <void*>definition, NULL)
    return <uintptr_t>err


# -- linear memory ----------------------------------------------------------------------------

cdef class Memory:
    """Bounds-checked access to one instance's memory through its data pointer.

    The engine keeps memory in place (`memory_may_move = False`), so the base address is read
    again only when an access falls beyond the size last seen (memory never shrinks). Every
    accessor answers None/False for an out-of-bounds or negative address instead of raising, so
    host functions can answer INVALID_MEMORY_ACCESS.
    """

    cdef wasmtime_context_t* _ctx
    cdef wasmtime_memory_t _mem
    cdef uint8_t* _base
    cdef readonly size_t size

    def __init__(self, uintptr_t context, uintptr_t memory):
        """`memory`: the address of a `wasmtime_memory_t` (copied)."""
        self._ctx = <wasmtime_context_t*><void*>context
        memcpy(&self._mem, <void*>memory, sizeof(wasmtime_memory_t))
        self.size = 0
        self._base = NULL
        self.refresh()

    def refresh(self):
        self._refresh()

    cdef inline void _refresh(self) noexcept:
        cdef size_t size = _memory_data_size(self._ctx, &self._mem)
        if size != self.size:
            self._base = _memory_data(self._ctx, &self._mem)
            self.size = size

    cdef inline bint _fits(self, long long ptr, long long length) noexcept:
        if ptr < 0 or length < 0:
            return False
        if <unsigned long long>(ptr + length) <= self.size:
            return True
        self._refresh()
        return <unsigned long long>(ptr + length) <= self.size

    def fits(self, long long ptr, long long length):
        """Whether [ptr, ptr+length) is inside memory, looking again if memory may have grown."""
        return self._fits(ptr, length)

    def read(self, long long ptr, long long length):
        """A copy of [ptr, ptr+length) as bytes, or None when out of bounds."""
        return self._read(ptr, length)

    cdef inline object _read(self, long long ptr, long long length):
        if not self._fits(ptr, length):
            return None
        return PyBytes_FromStringAndSize(<char*>(self._base + ptr), length)

    def write(self, long long ptr, data):
        cdef bytes raw = data if type(data) is bytes else bytes(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
        if not self._fits(ptr, n):
            return False
        memcpy(self._base + ptr, PyBytes_AS_STRING(raw), n)
        return True

    def write_u32(self, long long ptr, value):
        return self._write_u32(ptr, value)

    cdef inline bint _write_u32(self, long long ptr, object value) except -1:
        cdef uint32_t v = <uint32_t>(<unsigned long long>(value & 0xFFFFFFFF))
        if not self._fits(ptr, 4):
            return False
        memcpy(self._base + ptr, &v, 4)  # wasm memory is little-endian, like the hosts sluice runs on
        return True

    def write_u64(self, long long ptr, value):
        cdef uint64_t v = <uint64_t>(<unsigned long long>(value & 0xFFFFFFFFFFFFFFFF))
        if not self._fits(ptr, 8):
            return False
        memcpy(self._base + ptr, &v, 8)
        return True

    cdef bint _return_bytes(self, object allocator, bytes data, long long ptr_ptr, long long size_ptr) except -1:
        # The returned-buffer protocol (reference 4.2) for non-empty `data` (`return_result`):
        # allocate its size with the module's `allocator` (a nested call into wasm, under the
        # running callback's deadline; its WasmTrap propagates), copy it there, write the pointer
        # and size. False if the module's pointer or the out-pointers are out of bounds.
        cdef object ptr
        if type(allocator) is not Func and not isinstance(allocator, Func):
            ptr = allocator(PyBytes_GET_SIZE(data))
        else:
            ptr = (<Func>allocator)._call((PyBytes_GET_SIZE(data),))
        return self._write_returned(ptr & 0xFFFFFFFF, data, ptr_ptr, size_ptr)

    def write_returned(self, long long ptr, bytes data, long long ptr_ptr, long long size_ptr):
        """The returned-buffer protocol's writes: `data` at `ptr` (just allocated in the module),
        then `ptr` and the size at `ptr_ptr` and `size_ptr`. False if any is out of bounds
        (nothing partial is written before the bounds of the data are checked)."""
        return self._write_returned(ptr, data, ptr_ptr, size_ptr)

    cdef bint _write_returned(self, long long ptr, bytes data, long long ptr_ptr, long long size_ptr) noexcept:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef uint32_t p = <uint32_t>ptr
        cdef uint32_t s = <uint32_t>n
        if ptr == 0 or not self._fits(ptr, n):
            return False
        memcpy(self._base + ptr, PyBytes_AS_STRING(data), n)
        if not (self._fits(ptr_ptr, 4) and self._fits(size_ptr, 4)):
            return False
        memcpy(self._base + ptr_ptr, &p, 4)
        memcpy(self._base + size_ptr, &s, 4)
        return True


# -- the hottest host functions ----------------------------------------------------------------
# proxy-wasm-cpp-host's exports.cc shape: unpack the arguments (pointers into linear memory,
# validated; UTF-8 decoded with surrogateescape), ask the acting context or the VM what the call
# means (`vm.StreamContext`, `vm.WasmVM`: Python, where the ABI's rules live), write the answer
# back. Python frames per call are what a filter's host calls cost, so these few are here; the
# header writes (filters set several headers a request) also make their write here, below.

cdef object _OK = 0
cdef object _NOT_FOUND = 1
cdef object _BAD_ARGUMENT = 2
cdef object _INVALID_MEMORY_ACCESS = 6
cdef tuple _LEVELS = ()


def set_constants(tuple levels, tuple results):
    """The `LogLevel` and `WasmResult` members by value, so that answers here are the members
    the Python host functions answer (and proxy_log hands the VM a level, not an int)."""
    global _LEVELS, _OK, _NOT_FOUND, _BAD_ARGUMENT, _INVALID_MEMORY_ACCESS
    _LEVELS = levels
    _OK, _NOT_FOUND, _BAD_ARGUMENT, _INVALID_MEMORY_ACCESS = results[0], results[1], results[2], results[6]


cdef object return_result(VMCore vm, Memory mem, bytes data, long long ptr_ptr, long long size_ptr):
    """The returned-buffer protocol (reference 4.2): allocate in the module, copy, report.

    The allocator runs nested inside the host call that needs the buffer, on its frame; a trap
    there is kept as `vm.nested_trap`, the cause the outer call reports."""
    cdef uint32_t zero = 0
    if PyBytes_GET_SIZE(data) == 0:
        if mem._fits(ptr_ptr, 4) and mem._fits(size_ptr, 4):
            memcpy(mem._base + ptr_ptr, &zero, 4)
            memcpy(mem._base + size_ptr, &zero, 4)
            return _OK
        return _INVALID_MEMORY_ACCESS
    try:
        if mem._return_bytes(vm.allocator, data, ptr_ptr, size_ptr):
            return _OK
    except BaseException as exc:
        if isinstance(exc, _trap_type):
            vm.nested_trap = exc
        raise
    return _INVALID_MEMORY_ACCESS


def return_bytes(VMCore vm, Memory mem not None, data, long long ptr_ptr, long long size_ptr):
    """`return_result` for Python callers (`WasmVM.return_bytes`)."""
    return return_result(vm, mem, data if type(data) is bytes else bytes(data), ptr_ptr, size_ptr)


cdef class LogThreshold:
    """A filter's log level, shared by the plugin and its VMs: called, it answers the `LogLevel`
    (`VMOwner.log_level()`); the compiled proxy_log reads the number without a call."""

    cdef int level

    def __init__(self, int level):
        self.level = level

    def set(self, int level):
        self.level = level

    def __call__(self):
        return _LEVELS[self.level]


cdef class HostCalls:
    """The compiled `env` host functions of one VM, the base of `hostcalls.ProxyHostCalls` (which
    defines the others in Python). Their bound methods are the VM's `host_impls` like the rest."""

    cdef VMCore _vm
    cdef Memory _memory  # None until the instance's memory is bound: every access fails then
    cdef LogThreshold _threshold  # the owner's, when its log_level is one (else None: a call)

    def __init__(self, VMCore vm):
        self._vm = vm
        self._memory = None
        level = vm.log_level
        self._threshold = level if isinstance(level, LogThreshold) else None

    def bind_memory(self, Memory memory):
        self._memory = memory

    cdef inline object _acting(self):
        """The context the running callback acts for (its effective context, if it set one)."""
        cdef list frames = self._vm.frames
        cdef Frame frame = <Frame>PyList_GET_ITEM(frames, PyList_GET_SIZE(frames) - 1)
        return frame.context if frame.effective is None else frame.effective

    cdef inline object _text(self, long long ptr, long long size):
        """The UTF-8 text at [ptr, ptr+size) (surrogateescape), or None when out of bounds."""
        cdef Memory mem = self._memory
        if mem is None or not mem._fits(ptr, size):
            return None
        return PyUnicode_DecodeUTF8(<char*>(mem._base + ptr), size, "surrogateescape")

    def proxy_log(self, long long level, long long ptr, long long size):
        cdef Memory mem = self._memory
        if level < 0 or level > 5:
            return _BAD_ARGUMENT
        if level < (self._threshold.level if self._threshold is not None else self._vm.log_level()):
            # Below the filter's level: SDKs log chattily at debug, so answer before any copy.
            # The pointer is still validated, as cpp-host does.
            return _OK if mem is not None and mem._fits(ptr, size) else _INVALID_MEMORY_ACCESS
        text = self._text(ptr, size)
        if text is None:
            return _INVALID_MEMORY_ACCESS
        self._vm.log(_LEVELS[level], text)
        return _OK

    def proxy_get_header_map_value(self, long long mtype, long long kptr, long long klen,
                                   long long out_ptr, long long out_size):
        if mtype > 7:
            return _BAD_ARGUMENT
        key = self._text(kptr, klen)
        if key is None:
            return _INVALID_MEMORY_ACCESS
        ctx = self._acting()
        if ctx is None:
            return _BAD_ARGUMENT
        if isinstance(ctx, StreamCore):
            value = (<StreamCore>ctx)._header_value(mtype, key)
        else:
            value = ctx.get_header_value(mtype, key)
        if isinstance(value, str):
            return return_result(self._vm, self._memory, PyUnicode_AsEncodedString(value, "utf-8", "surrogateescape"),
                                 out_ptr, out_size)
        if value is None:
            # 0.1.0 answers OK with an empty value for a missing header.
            if self._vm.abi_version == "0.1.0":
                return return_result(self._vm, self._memory, b"", out_ptr, out_size)
            return _NOT_FOUND
        return value  # the context's error answer

    cdef object _map(self, long long mtype, bint write):
        """Map `mtype` of the acting context if it exists and may be used this way now, else None."""
        ctx = self._acting()
        if isinstance(ctx, StreamCore):
            return (<StreamCore>ctx)._header_map(mtype, write)
        return ctx.header_map(mtype, write) if ctx is not None else None

    cdef inline object _bytes(self, long long ptr, long long size):
        """A copy of [ptr, ptr+size) as bytes, or None when out of bounds."""
        cdef Memory mem = self._memory
        return None if mem is None else mem._read(ptr, size)

    def proxy_get_shared_data(self, long long kptr, long long klen, long long out_ptr, long long out_size,
                              long long out_cas):
        key = self._bytes(kptr, klen)
        if key is None:
            return _INVALID_MEMORY_ACCESS
        entry = self._vm.get_shared(key)
        if entry is None:
            return _NOT_FOUND
        value, cas = entry
        cdef Memory mem = self._memory
        if not mem._write_u32(out_cas, cas):
            return _INVALID_MEMORY_ACCESS
        return return_result(self._vm, mem, value if type(value) is bytes else bytes(value), out_ptr, out_size)

    def proxy_set_shared_data(self, long long kptr, long long klen, long long vptr, long long vlen, long long cas):
        key = self._bytes(kptr, klen)
        value = self._bytes(vptr, vlen)
        if key is None or value is None:
            return _INVALID_MEMORY_ACCESS
        return self._vm.set_shared(key, value, cas)

    # The arguments as the trampoline made them (an i64 may carry any u64): no C conversion.
    def proxy_increment_metric(self, metric_id, offset):
        return self._vm.metrics.increment(metric_id, offset)

    def proxy_record_metric(self, metric_id, value):
        return self._vm.metrics.record(metric_id, value)

    def proxy_get_header_map_pairs(self, long long mtype, long long out_ptr, long long out_size):
        if mtype > 7:
            return _BAD_ARGUMENT
        hmap = self._map(mtype, False)
        data = _serialize_pairs(hmap._items) if hmap is not None else b""
        return return_result(self._vm, self._memory, data, out_ptr, out_size)

    def proxy_remove_header_map_value(self, long long mtype, long long kptr, long long klen):
        if mtype > 7:
            return _BAD_ARGUMENT
        key = self._text(kptr, klen)
        if key is None:
            return _INVALID_MEMORY_ACCESS
        hmap = self._map(mtype, True)
        if hmap is None:
            return _BAD_ARGUMENT
        hmap.remove(key)
        return _OK

    cdef object _header_write(self, long long mtype, long long kptr, long long klen, long long vptr,
                              long long vlen, bint replace):
        """An add (or, `replace`, a replace) of a header value in map `mtype`, within the limits."""
        if mtype > 7:
            return _BAD_ARGUMENT
        key = self._text(kptr, klen)
        value = self._text(vptr, vlen)
        if key is None or value is None:
            return _INVALID_MEMORY_ACCESS
        hmap = self._map(mtype, True)
        if hmap is None:
            return _BAD_ARGUMENT
        cdef VMCore vm = self._vm
        cdef int fit
        if replace:
            fit = _set_within(hmap, key.lower(), value, vm.max_headers, vm.max_header_bytes)
        else:
            fit = _add_within(hmap, key, value, vm.max_headers, vm.max_header_bytes)
        return _OK if fit == FITS else vm.refuse_header_limit(fit)

    def proxy_add_header_map_value(self, long long mtype, long long kptr, long long klen, long long vptr,
                                   long long vlen):
        return self._header_write(mtype, kptr, klen, vptr, vlen, False)

    def proxy_replace_header_map_value(self, long long mtype, long long kptr, long long klen, long long vptr,
                                       long long vlen):
        return self._header_write(mtype, kptr, klen, vptr, vlen, True)


# -- header maps, as the host calls read and write them ----------------------------------------
# `headers.HeaderMap`'s lookup, and its add and set held to a filter's limits, for the host calls
# above: on the map's fields here, since a Python frame per call is what those calls cost (a
# filter reads and sets several headers a request). Only the usual cases are here (ASCII text, a
# regular name there once or not at all); the rest (a pseudo-header added, a name there more than
# once) goes through the map's own methods, where its rules live. `tests/test_abi_headermap.py`
# holds these to the Python methods.

cdef enum:
    FITS = 0
    TOO_MANY = 1  # more entries than allowed
    TOO_LARGE = 2  # more bytes (names and values) than allowed

HEADER_FITS, HEADER_TOO_MANY, HEADER_TOO_LARGE = FITS, TOO_MANY, TOO_LARGE
"""What `header_add_within` and `header_set_within` answer (and `WasmVM.refuse_header_limit` reads)."""


cdef inline Py_ssize_t _utf8_len(str text) except -1:
    if PyUnicode_IS_ASCII(text):
        return PyUnicode_GET_LENGTH(text)
    return PyBytes_GET_SIZE(PyUnicode_AsEncodedString(text, "utf-8", "surrogateescape"))


cdef list _names_of(object hmap):
    """`HeaderMap._index()`: the names of the entries, in order, made once and kept in the map."""
    names = hmap._names
    if names is not None:
        return <list>names
    cdef list items = hmap._items
    cdef list made = []
    for item in items:
        made.append((<tuple>item)[0])
    hmap._names = made
    return made


cdef Py_ssize_t _size_of(object hmap) except -1:
    """`HeaderMap.byte_size()`: bytes of the names and values, measured once and kept in the map."""
    cdef Py_ssize_t size = hmap._size
    if size >= 0:
        return size
    size = 0
    for item in <list>hmap._items:
        size += _utf8_len((<tuple>item)[0]) + _utf8_len((<tuple>item)[1])
    hmap._size = size
    return size


cdef object _header_get(object hmap, str name):
    """`HeaderMap.get(name)`: the first value of `name`, or None (proxy_get_header_map_value)."""
    name = name.lower()
    cdef list items = hmap._items
    cdef Py_ssize_t n = PyList_GET_SIZE(items), i
    if n and <str>(<tuple>PyList_GET_ITEM(items, 0))[0] == name:
        return (<tuple>PyList_GET_ITEM(items, 0))[1]  # `:method`, `:status`
    cdef list names = _names_of(hmap)
    for i in range(n):
        if <str>PyList_GET_ITEM(names, i) == name:
            return (<tuple>PyList_GET_ITEM(items, i))[1]
    return None


cdef int _add_within(object hmap, str name, str value, Py_ssize_t max_entries, Py_ssize_t max_bytes) except -1:
    """`hmap.add(name, value)` unless the map would then hold more than `max_entries` entries or
    `max_bytes` bytes: FITS (added), TOO_MANY or TOO_LARGE (unchanged)."""
    cdef list items = hmap._items
    if PyList_GET_SIZE(items) >= max_entries:
        return TOO_MANY
    name = name.lower()  # measured as stored
    cdef Py_ssize_t size = _size_of(hmap) + _utf8_len(name) + _utf8_len(value)
    if size > max_bytes:
        return TOO_LARGE
    if PyUnicode_GET_LENGTH(name) and name[0] == ":":
        hmap.add(name, value)  # pseudo-headers go in front
        return FITS
    hmap.writes = hmap.writes + 1
    items.append((name, value))
    names = hmap._names
    if names is not None:
        (<list>names).append(name)
    hmap._size = size
    return FITS


cdef int _set_within(object hmap, str name, str value, Py_ssize_t max_entries, Py_ssize_t max_bytes) except -1:
    """`hmap.set(name, value)` (every entry of the lower-case `name` replaced by one) unless the map
    would then hold more than `max_entries` entries or `max_bytes` bytes: FITS (set), TOO_MANY or
    TOO_LARGE (unchanged)."""
    cdef list items = hmap._items
    cdef list names = _names_of(hmap)
    cdef Py_ssize_t size = _size_of(hmap)
    cdef Py_ssize_t n = PyList_GET_SIZE(names), i, first = -1, count = 0
    cdef str old
    for i in range(n):
        if <str>PyList_GET_ITEM(names, i) == name:
            count += 1
            if first < 0:
                first = i
    if count > 1:  # rare: a name that came more than once
        for i in range(n):
            if <str>PyList_GET_ITEM(names, i) == name:
                old = (<tuple>PyList_GET_ITEM(items, i))[1]
                size -= _utf8_len(name) + _utf8_len(old)
        if size + _utf8_len(name) + _utf8_len(value) > max_bytes:
            return TOO_LARGE
        hmap.set(name, value)
        return FITS
    if count == 1:
        old = (<tuple>PyList_GET_ITEM(items, first))[1]
        size += _utf8_len(value) - _utf8_len(old)  # the name's bytes cancel out
        if size > max_bytes:
            return TOO_LARGE
        hmap.writes = hmap.writes + 1
        items[first] = (name, value)
        hmap._size = size
        return FITS
    return _add_within(hmap, name, value, max_entries, max_bytes)  # not there: an add


cdef inline object _wire(object part):
    """A name or value as the pairs format carries it: exactly `bytes` (what the writer below
    copies), or an ASCII str (its characters are its bytes); any other str is encoded (UTF-8,
    surrogateescape), any other bytes-like copied, anything else refused (TypeError)."""
    if type(part) is bytes:
        return part
    if isinstance(part, str):
        return part if PyUnicode_IS_ASCII(part) else PyUnicode_AsEncodedString(part, "utf-8", "surrogateescape")
    if isinstance(part, (bytes, bytearray, memoryview)):
        return bytes(part)
    raise TypeError(f"a header name or value must be str or bytes, not {type(part).__name__}")


cdef inline void _put_u32(char* at, Py_ssize_t value) noexcept:
    cdef uint32_t v = <uint32_t>value
    at[0] = <char>(v & 0xFF)
    at[1] = <char>((v >> 8) & 0xFF)
    at[2] = <char>((v >> 16) & 0xFF)
    at[3] = <char>((v >> 24) & 0xFF)


cdef bytes _serialize_pairs(object items):
    """The proxy-wasm pairs format (reference 4.1): u32 count, (u32 key_len, u32 value_len) each,
    then key NUL value NUL each; no pairs give no bytes."""
    cdef list parts = []
    for name, value in items:
        parts.append(_wire(name))
        parts.append(_wire(value))
    cdef Py_ssize_t n = PyList_GET_SIZE(parts), i, size, total = 4 + 5 * n
    if n == 0:
        return b""
    for part in parts:
        total += PyBytes_GET_SIZE(part) if type(part) is bytes else PyUnicode_GET_LENGTH(part)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* buf = PyBytes_AS_STRING(out)
    cdef char* data = buf + 4 + 4 * n
    _put_u32(buf, n // 2)
    for i in range(n):
        part = <object>PyList_GET_ITEM(parts, i)
        if type(part) is bytes:
            size = PyBytes_GET_SIZE(part)
            memcpy(data, PyBytes_AS_STRING(part), size)
        else:
            size = PyUnicode_GET_LENGTH(part)
            memcpy(data, PyUnicode_DATA(part), size)  # ASCII: one byte per character
        _put_u32(buf + 4 + 4 * i, size)
        data[size] = 0
        data += size + 1
    return out


def serialize_pairs(items):
    """Encode (name, value) pairs, str or bytes, in the pairs format: u32 count, (u32 key_len,
    u32 value_len) each, then key NUL value NUL each (empty for no pairs)."""
    return _serialize_pairs(items)


def header_get(hmap, str name):
    """`_header_get` for Python callers (tests): what HeaderMap.get(name) answers."""
    return _header_get(hmap, name)


def header_add_within(hmap, str name, str value, Py_ssize_t max_entries, Py_ssize_t max_bytes):
    """`_add_within` for Python callers (tests): HEADER_FITS, HEADER_TOO_MANY or HEADER_TOO_LARGE."""
    return _add_within(hmap, name, value, max_entries, max_bytes)


def header_set_within(hmap, str name, str value, Py_ssize_t max_entries, Py_ssize_t max_bytes):
    """`_set_within` for Python callers (tests); `name` lower-case."""
    return _set_within(hmap, name, value, max_entries, max_bytes)


# -- the cycle collector ------------------------------------------------------------------------

def gc_pause():
    """Disable the cycle collector; whether it was enabled (for `gc_resume`)."""
    return PyGC_Disable() == 1


def gc_resume():
    PyGC_Enable()
