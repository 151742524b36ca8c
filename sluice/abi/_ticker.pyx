# cython: language_level=3
"""The epoch ticker as one native thread: sleep one tick, advance the engine's epoch, repeat.

A POSIX timer with SIGEV_THREAD (the ticker `fastcall` falls back to) makes glibc create a new
thread for every expiration: at a 2 ms tick that is 500 thread creations a second, ~4% of a core
while sluice is idle. This thread runs no Python and never takes the GIL. It is handed the
address of `wasmtime_engine_increment_epoch` and of the engine by `fastcall` (the one module that
touches wasmtime's C API), so it links against nothing but libc.
"""

from libc.stdint cimport uintptr_t
from libc.stdlib cimport malloc

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    int pthread_create(pthread_t* thread, const pthread_attr_t* attr,
                       void* (*start)(void*) noexcept nogil, void* arg)
    int pthread_detach(pthread_t thread)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int nanosleep(const timespec* req, timespec* rem)

ctypedef void (*tick_fn)(void*) noexcept nogil

cdef struct Ticker:
    tick_fn fn
    void* arg
    long period_ns
    volatile int stop

cdef Ticker* _running = NULL


cdef void* _run(void* raw) noexcept nogil:
    cdef Ticker* t = <Ticker*>raw
    cdef timespec period
    period.tv_sec = t.period_ns // 1000000000
    period.tv_nsec = t.period_ns % 1000000000
    # A relative sleep: a late wake-up makes the tick longer, so a deadline is never shorter.
    while not t.stop:
        nanosleep(&period, NULL)
        if t.stop:
            break
        t.fn(t.arg)
    return NULL


def start(uintptr_t fn, uintptr_t arg, long period_ns) -> bool:
    """Call the C function at `fn` with `arg` every `period_ns` from a new native thread.
    At most one ticker per process; returns False if the thread cannot be created."""
    global _running
    if _running != NULL:
        return False
    cdef Ticker* t = <Ticker*>malloc(sizeof(Ticker))
    if t == NULL:
        return False
    t.fn = <tick_fn>fn
    t.arg = <void*>arg
    t.period_ns = period_ns
    t.stop = 0
    cdef pthread_t thread
    if pthread_create(&thread, NULL, _run, t) != 0:
        return False
    pthread_detach(thread)
    _running = t
    return True


def stop() -> None:
    """Stop ticking (at interpreter exit). The Ticker is left allocated: the thread may still be
    reading it while it wakes up for the last time."""
    if _running != NULL:
        _running.stop = 1
