# cython: language_level=3
# The parts of wasmtime's component C API (wasmtime 50, include/wasmtime/component/val.h, func.h,
# linker.h) that `_component_call` uses, declared here because wasmtime-py ships the library but
# no headers. Named `_component_capi`, not `_wasmtime`: the core-module half may declare its own.
#
# The layouts are the ones `fastcall_component` packs with `struct` ("<B7xQQQ": a kind byte, then
# a 24-byte union); the functions are not linked against but called through addresses that
# `fastcall_component` takes from the library wasmtime-py loaded (after `fastcall`'s version check).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    K_BOOL = 0
    K_U8 = 2
    K_U16 = 4
    K_U32 = 6
    K_STRING = 12
    K_LIST = 13
    K_RECORD = 14
    K_TUPLE = 15
    K_VARIANT = 16
    K_ENUM = 17
    K_OPTION = 18
    K_RESULT = 19

cdef struct cval_t
cdef struct cval_entry_t

# wasm_name_t / wasm_byte_vec_t
cdef struct cname_t:
    size_t size
    const char* data

# wasmtime_component_vallist_t (lists and tuples)
cdef struct clist_t:
    size_t size
    cval_t* data

# wasmtime_component_valrecord_t
cdef struct crecord_t:
    size_t size
    cval_entry_t* data

# wasmtime_component_valvariant_t: case name, payload (NULL: none)
cdef struct cvariant_t:
    cname_t discriminant
    cval_t* val

# wasmtime_component_valresult_t: is_ok, payload (NULL: none)
cdef struct cresult_t:
    uint8_t is_ok
    cval_t* val

cdef union cunion_t:
    uint8_t boolean
    uint8_t u8
    uint16_t u16
    uint32_t u32
    uint64_t u64
    cname_t string
    clist_t list
    crecord_t record
    cvariant_t variant
    cname_t enumeration
    cval_t* option
    cresult_t result

# wasmtime_component_val_t: 32 bytes
cdef struct cval_t:
    uint8_t kind
    cunion_t of

# wasmtime_component_valrecord_entry_t: 48 bytes
cdef struct cval_entry_t:
    cname_t name
    cval_t val

# wasmtime_component_func_call(func, context, args, nargs, results, nresults) -> wasmtime_error_t*
ctypedef void* (*func_call_fn)(const void*, void*, const cval_t*, size_t, cval_t*, size_t) noexcept nogil
# wasmtime_component_func_post_return(func, context) -> wasmtime_error_t*
ctypedef void* (*post_return_fn)(const void*, void*) noexcept nogil
# wasmtime_component_val_delete(value): drop in place
ctypedef void (*val_delete_fn)(cval_t*) noexcept nogil
# wasmtime_component_val_clone(src, dst): deep copy into wasmtime-owned memory
ctypedef void (*val_clone_fn)(const cval_t*, cval_t*) noexcept nogil
# wasmtime_error_new(message) -> wasmtime_error_t*
ctypedef void* (*error_new_fn)(const char*) noexcept nogil
# wasmtime_component_func_callback_t(env, context, type, args, nargs, results, nresults) -> error
ctypedef void* (*host_fn)(void*, void*, const void*, cval_t*, size_t, cval_t*, size_t) noexcept
ctypedef void (*finalizer_fn)(void*) noexcept nogil
# wasmtime_component_linker_instance_add_func(instance, name, len, callback, env, finalizer) -> error
ctypedef void* (*add_func_fn)(void*, const char*, size_t, host_fn, void*, finalizer_fn) noexcept
