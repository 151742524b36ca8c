# cython: language_level=3
"""The part of wasmtime's C API (wasmtime 50, `wasmtime.h`) that sluice's compiled fast-call
layer uses, declared once for every extension that cimports it.

Nothing here is linked: the extensions get the address of each C entry point at run time from
`sluice.abi.fastcall` (which loads wasmtime-py's own `_libwasmtime.so` and checks its version),
so they build with nothing but a C compiler. Hence the entry points are declared as function
pointer *types*, and the structs are mirrored byte for byte from the header.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

cdef extern from *:
    """
    typedef struct wasmtime_context wasmtime_context_t;
    typedef struct wasmtime_caller wasmtime_caller_t;
    typedef struct wasmtime_linker wasmtime_linker_t;
    typedef struct wasmtime_error wasmtime_error_t;
    typedef struct wasm_trap_t wasm_trap_t;
    typedef struct wasm_functype_t wasm_functype_t;

    /* wasmtime/extern.h: a function or memory of one store, by index (the memory's layout is
       the header's: an anonymous {store_id, __private1} struct, padded to 16 bytes, then __private2). */
    typedef struct wasmtime_func { uint64_t store_id; void *__private; } wasmtime_func_t;
    typedef struct wasmtime_memory {
        struct { uint64_t store_id; uint32_t __private1; };
        uint32_t __private2;
    } wasmtime_memory_t;

    /* wasmtime/val.h: one 16-byte slot of the unchecked calling convention. */
    typedef union wasmtime_val_raw {
        int32_t i32; int64_t i64; float f32; double f64; uint8_t v128[16];
        uint32_t anyref; uint32_t externref; uint32_t exnref; void *funcref;
    } wasmtime_val_raw_t;

    typedef wasm_trap_t *(*wasmtime_func_unchecked_callback_t)(
        void *env, wasmtime_caller_t *caller, wasmtime_val_raw_t *args_and_results, size_t num_args_and_results);
    typedef void (*wasmtime_finalizer_t)(void *);

    /* Entry points, as the types of pointers to them. */
    typedef wasmtime_error_t *(*wasmtime_func_call_unchecked_fn)(
        wasmtime_context_t *store, const wasmtime_func_t *func, wasmtime_val_raw_t *args_and_results,
        size_t args_and_results_len, wasm_trap_t **trap);
    typedef void (*wasmtime_context_set_epoch_deadline_fn)(wasmtime_context_t *context, uint64_t ticks_beyond_current);
    typedef uint8_t *(*wasmtime_memory_data_fn)(const wasmtime_context_t *store, const wasmtime_memory_t *memory);
    typedef size_t (*wasmtime_memory_data_size_fn)(const wasmtime_context_t *store, const wasmtime_memory_t *memory);
    typedef wasm_trap_t *(*wasmtime_trap_new_fn)(const char *msg, size_t msg_len);
    typedef wasmtime_error_t *(*wasmtime_linker_define_func_unchecked_fn)(
        wasmtime_linker_t *linker, const char *module, size_t module_len, const char *name, size_t name_len,
        const wasm_functype_t *ty, wasmtime_func_unchecked_callback_t cb, void *data, wasmtime_finalizer_t finalizer);
    """
    ctypedef struct wasmtime_context_t
    ctypedef struct wasmtime_caller_t
    ctypedef struct wasmtime_linker_t
    ctypedef struct wasmtime_error_t
    ctypedef struct wasm_trap_t
    ctypedef struct wasm_functype_t

    ctypedef struct wasmtime_func_t:
        uint64_t store_id

    ctypedef struct wasmtime_memory_t:
        uint64_t store_id

    ctypedef union wasmtime_val_raw_t:
        int32_t i32
        int64_t i64
        float f32
        double f64
        uint8_t v128[16]

    ctypedef wasm_trap_t* (*wasmtime_func_unchecked_callback_t)(
        void* env, wasmtime_caller_t* caller, wasmtime_val_raw_t* args_and_results,
        size_t num_args_and_results) noexcept
    ctypedef void (*wasmtime_finalizer_t)(void*) noexcept

    ctypedef wasmtime_error_t* (*wasmtime_func_call_unchecked_fn)(
        wasmtime_context_t* store, const wasmtime_func_t* func, wasmtime_val_raw_t* args_and_results,
        size_t args_and_results_len, wasm_trap_t** trap) noexcept nogil
    ctypedef void (*wasmtime_context_set_epoch_deadline_fn)(
        wasmtime_context_t* context, uint64_t ticks_beyond_current) noexcept nogil
    ctypedef uint8_t* (*wasmtime_memory_data_fn)(
        const wasmtime_context_t* store, const wasmtime_memory_t* memory) noexcept nogil
    ctypedef size_t (*wasmtime_memory_data_size_fn)(
        const wasmtime_context_t* store, const wasmtime_memory_t* memory) noexcept nogil
    ctypedef wasm_trap_t* (*wasmtime_trap_new_fn)(const char* msg, size_t msg_len) noexcept nogil
    ctypedef wasmtime_error_t* (*wasmtime_linker_define_func_unchecked_fn)(
        wasmtime_linker_t* linker, const char* module, size_t module_len, const char* name, size_t name_len,
        const wasm_functype_t* ty, wasmtime_func_unchecked_callback_t cb, void* data,
        wasmtime_finalizer_t finalizer) noexcept nogil
