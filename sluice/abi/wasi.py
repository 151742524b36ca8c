"""The WASI preview 1 subset a filter may use (reference section 5), under both module names.

Capability model: a filter gets stdout/stderr (routed to its log), clocks, randomness and the
environment variables its configuration grants; nothing else. Files, directories and sockets
answer an error; `proc_exit` ends the VM as a trap.
"""

from __future__ import annotations

import os
import struct
import time

from .fastcall import HostTrap
from .types import LogLevel
from .vm import WasmVM

MODULES = ("wasi_snapshot_preview1", "wasi_unstable")

SUCCESS = 0
BADF = 8
NOTDIR = 20
FAULT = 21
INVAL = 28
NOENT = 44
NOSYS = 52
NOTSUP = 58

RANDOM_MAX = 65536


class RandomPool:
    """Kernel random bytes fetched 4 KiB at a time and each handed out once: a filter asking for a
    few bytes per request (an A/B split) costs no `getrandom` syscall per request. A forked child
    (a fleet worker) starts with an empty pool, so no two processes hand out the same bytes."""

    REFILL = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool = b""
        self._at = 0

    def take(self, length: int) -> bytes:
        at = self._at
        if at + length > len(self._pool):
            if length > self.REFILL:
                return os.urandom(length)
            self._pool = os.urandom(self.REFILL)
            at = 0
        self._at = at + length
        return self._pool[at : at + length]


_RANDOM = RandomPool()

# (name, params, results); "I" = unsigned i32, "q" = i64.
FUNCTIONS: list[tuple[str, str, str]] = [
    ("fd_write", "IIII", "i"),
    ("fd_read", "IIII", "i"),
    ("fd_seek", "IqII", "i"),
    ("fd_close", "I", "i"),
    ("fd_fdstat_get", "II", "i"),
    ("fd_fdstat_set_flags", "II", "i"),
    ("fd_fdstat_set_rights", "Iqq", "i"),
    ("fd_prestat_get", "II", "i"),
    ("fd_prestat_dir_name", "III", "i"),
    ("fd_advise", "IqqI", "i"),
    ("fd_allocate", "Iqq", "i"),
    ("fd_datasync", "I", "i"),
    ("fd_sync", "I", "i"),
    ("fd_filestat_get", "II", "i"),
    ("fd_filestat_set_size", "Iq", "i"),
    ("fd_filestat_set_times", "IqqI", "i"),
    ("fd_pread", "IIIqI", "i"),
    ("fd_pwrite", "IIIqI", "i"),
    ("fd_readdir", "IIIqI", "i"),
    ("fd_renumber", "II", "i"),
    ("fd_tell", "II", "i"),
    ("environ_get", "II", "i"),
    ("environ_sizes_get", "II", "i"),
    ("args_get", "II", "i"),
    ("args_sizes_get", "II", "i"),
    ("clock_time_get", "IqI", "i"),
    ("clock_res_get", "II", "i"),
    ("random_get", "II", "i"),
    ("proc_exit", "I", ""),
    ("proc_raise", "I", "i"),
    ("sched_yield", "", "i"),
    ("poll_oneoff", "IIII", "i"),
    ("path_open", "IIIIIqqII", "i"),
    ("path_create_directory", "III", "i"),
    ("path_remove_directory", "III", "i"),
    ("path_unlink_file", "III", "i"),
    ("path_filestat_get", "IIIII", "i"),
    ("path_filestat_set_times", "IIIIqqI", "i"),
    ("path_link", "IIIIIII", "i"),
    ("path_readlink", "IIIIII", "i"),
    ("path_rename", "IIIIII", "i"),
    ("path_symlink", "IIIII", "i"),
    ("sock_accept", "III", "i"),
    ("sock_recv", "IIIIII", "i"),
    ("sock_send", "IIIII", "i"),
    ("sock_shutdown", "II", "i"),
]


def _std(fd: int) -> bool:
    return fd in (1, 2)


class Wasi:
    def __init__(self, vm: WasmVM) -> None:
        self.vm = vm
        env = vm.environment()
        self._environ = [f"{k}={v}".encode() + b"\0" for k, v in env.items()]

    # -- stdio -------------------------------------------------------------------------------------
    def _gather(self, iovs: int, count: int) -> bytes | None:
        mem = self.vm.memory
        raw = mem.read(iovs, 8 * count)
        if raw is None:
            return None
        parts = []
        for i in range(count):
            ptr, size = struct.unpack_from("<II", raw, 8 * i)
            chunk = mem.read(ptr, size)
            if chunk is None:
                return None
            parts.append(chunk)
        return b"".join(parts)

    def fd_write(self, fd: int, iovs: int, count: int, out_written: int) -> int:
        if not _std(fd):
            return BADF
        data = self._gather(iovs, count)
        if data is None:
            return FAULT
        if not self.vm.memory.write_u32(out_written, len(data)):
            return FAULT
        text = data.decode("utf-8", "replace")
        if text.endswith("\n"):
            text = text[:-1]
        self.vm.log(LogLevel.INFO if fd == 1 else LogLevel.ERROR, text)
        return SUCCESS

    def fd_pwrite(self, fd: int, iovs: int, count: int, _offset: int, out_written: int) -> int:
        return self.fd_write(fd, iovs, count, out_written)

    def fd_read(self, fd: int, iovs: int, count: int, out_read: int) -> int:
        return NOSYS

    def fd_pread(self, fd: int, iovs: int, count: int, offset: int, out_read: int) -> int:
        return NOSYS

    def fd_seek(self, fd: int, offset: int, whence: int, out: int) -> int:
        return BADF if not _std(fd) else NOTSUP

    def fd_close(self, fd: int) -> int:
        return SUCCESS if _std(fd) else BADF

    def fd_fdstat_get(self, fd: int, out: int) -> int:
        if not _std(fd):
            return BADF
        # filetype 0 (unknown), flags 0, rights_base FD_WRITE (64), inheriting 0
        ok = self.vm.memory.write(out, struct.pack("<BxHxxxxQQ", 0, 0, 64, 0))
        return SUCCESS if ok else FAULT

    def fd_fdstat_set_flags(self, fd: int, flags: int) -> int:
        return NOSYS

    def _std_ok(self, fd: int) -> int:
        return SUCCESS if _std(fd) else BADF

    def fd_fdstat_set_rights(self, fd: int, base: int, inheriting: int) -> int:
        return self._std_ok(fd)

    def fd_advise(self, fd: int, offset: int, length: int, advice: int) -> int:
        return SUCCESS

    def fd_allocate(self, fd: int, offset: int, length: int) -> int:
        return self._std_ok(fd)

    def fd_datasync(self, fd: int) -> int:
        return self._std_ok(fd)

    def fd_sync(self, fd: int) -> int:
        return self._std_ok(fd)

    def fd_filestat_get(self, fd: int, out: int) -> int:
        return BADF

    def fd_filestat_set_size(self, fd: int, size: int) -> int:
        return self._std_ok(fd)

    def fd_filestat_set_times(self, fd: int, atim: int, mtim: int, flags: int) -> int:
        return self._std_ok(fd)

    def fd_prestat_get(self, fd: int, out: int) -> int:
        return BADF  # no preopened directories: ends libc's scan

    def fd_prestat_dir_name(self, fd: int, path: int, length: int) -> int:
        return NOSYS

    def fd_readdir(self, fd: int, buf: int, length: int, cookie: int, out: int) -> int:
        self.vm.memory.write_u32(out, 0)
        return NOTDIR

    def fd_renumber(self, fd: int, to: int) -> int:
        return NOTSUP if _std(fd) and _std(to) else BADF

    def fd_tell(self, fd: int, out: int) -> int:
        if not _std(fd):
            return BADF
        return SUCCESS if self.vm.memory.write_u64(out, 0) else FAULT

    # -- environment and arguments -------------------------------------------------------------
    def environ_sizes_get(self, out_count: int, out_size: int) -> int:
        mem = self.vm.memory
        ok = mem.write_u32(out_count, len(self._environ)) and mem.write_u32(
            out_size, sum(len(e) for e in self._environ)
        )
        return SUCCESS if ok else FAULT

    def environ_get(self, ptrs: int, buf: int) -> int:
        mem = self.vm.memory
        pos = buf
        for i, entry in enumerate(self._environ):
            if not (mem.write_u32(ptrs + 4 * i, pos) and mem.write(pos, entry)):
                return FAULT
            pos += len(entry)
        return SUCCESS

    def args_sizes_get(self, out_count: int, out_size: int) -> int:
        mem = self.vm.memory
        return SUCCESS if mem.write_u32(out_count, 0) and mem.write_u32(out_size, 0) else FAULT

    def args_get(self, argv: int, buf: int) -> int:
        return SUCCESS

    # -- clocks, randomness, scheduling --------------------------------------------------------
    def clock_time_get(self, clock: int, precision: int, out: int) -> int:
        if clock == 0:
            now = time.time_ns()
        elif clock == 1:
            now = time.monotonic_ns()
        else:
            return NOTSUP
        return SUCCESS if self.vm.memory.write_u64(out, now) else FAULT

    def clock_res_get(self, clock: int, out: int) -> int:
        if clock not in (0, 1):
            return NOTSUP
        return SUCCESS if self.vm.memory.write_u64(out, 1) else FAULT

    def random_get(self, buf: int, length: int) -> int:
        if length > RANDOM_MAX:
            return INVAL
        if length == 0:
            return SUCCESS
        return SUCCESS if self.vm.memory.write(buf, _RANDOM.take(length)) else FAULT

    def proc_exit(self, code: int) -> None:
        self.vm.log(LogLevel.ERROR, f"proc_exit({code})")
        raise HostTrap(f"proc_exit({code})", exit_code=code)

    def proc_raise(self, sig: int) -> int:
        return NOSYS

    def sched_yield(self) -> int:
        return SUCCESS

    def poll_oneoff(self, subs: int, events: int, count: int, out: int) -> int:
        # The Go runtime needs this to succeed; there is nothing to wait for in a filter.
        return SUCCESS if self.vm.memory.write_u32(out, 0) else FAULT

    # -- files and sockets: not granted ----------------------------------------------------------
    def path_open(self, fd: int, dirflags: int, path: int, path_len: int, oflags: int,
                  base: int, inheriting: int, fdflags: int, out_fd: int) -> int:
        return NOENT

    def path_create_directory(self, fd: int, path: int, length: int) -> int:
        return NOTSUP

    def path_remove_directory(self, fd: int, path: int, length: int) -> int:
        return NOTSUP

    def path_unlink_file(self, fd: int, path: int, length: int) -> int:
        return NOTSUP

    def path_filestat_get(self, fd: int, flags: int, path: int, length: int, out: int) -> int:
        return NOTSUP

    def path_filestat_set_times(self, fd: int, flags: int, path: int, length: int,
                                atim: int, mtim: int, fst: int) -> int:
        return NOTSUP

    def path_link(self, *_: int) -> int:
        return NOTSUP

    def path_readlink(self, fd: int, path: int, length: int, buf: int, buf_len: int, out: int) -> int:
        self.vm.memory.write_u32(out, 0)
        return NOTSUP

    def path_rename(self, *_: int) -> int:
        return NOTSUP

    def path_symlink(self, *_: int) -> int:
        return NOTSUP

    def sock_accept(self, fd: int, flags: int, out: int) -> int:
        self.vm.memory.write_u32(out, 0)
        return NOTSUP

    def sock_recv(self, fd: int, data: int, length: int, flags: int, out_len: int, out_flags: int) -> int:
        self.vm.memory.write_u32(out_len, 0)
        self.vm.memory.write_u32(out_flags, 0)
        return NOTSUP

    def sock_send(self, fd: int, data: int, length: int, flags: int, out_len: int) -> int:
        self.vm.memory.write_u32(out_len, 0)
        return NOTSUP

    def sock_shutdown(self, fd: int, how: int) -> int:
        return NOTSUP
