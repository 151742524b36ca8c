"""Host-wide shared data and shared queues in one LMDB environment (PyPI `lmdb`).

`LmdbSharedData` implements `shared.SharedData` and `LmdbQueues` implements `shared.Queues` for
every worker process of a host: the environment is a memory-mapped file that all of them open, so
a read is a lookup in shared memory (no round trip) and every change is a write transaction. LMDB
serializes write transactions across processes (a robust mutex in its lock file), which is what
makes CAS exact between workers: the compare and the write happen inside one transaction.

Semantics are those of `shared.InMemorySharedData` (cpp-host): one CAS counter for the whole
host that never hands out 0, `cas == 0` writes unconditionally, a missing key ignores the CAS.

Size: the map size bounds the file; `max_keys` bounds the number of shared-data keys. When either
is reached a write of a *new* key is refused (`proxy_set_shared_data` returns INTERNAL_FAILURE and
`refused` counts it); existing keys can still be updated and deleted. Refusal rather than LRU
eviction because eviction would need a write on every read (the recency stamp) and would silently
drop a filter's state, e.g. reset a rate-limit bucket.

Queues: a queue belongs to the (vm_id, name) it was registered under and is owned by the worker
whose VM registered it last (cpp-host rebinds on every register). Items live in LMDB, so they
outlive a worker restart. An enqueue in another process wakes the owner through a datagram on a
per-worker Unix socket (Linux: abstract namespace; a path next to the environment elsewhere)
carrying the 4-byte token; the owner's event loop reads it (`fileno()` / `drain_notifications()`)
and posts `proxy_on_queue_ready`. A datagram is fire-and-forget: if the owner is down, the items
wait and the owner's next `register` (its restarted VM configuring) delivers the wake-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import lmdb

from .types import WasmResult

__all__ = ["LmdbQueues", "LmdbSharedData", "LmdbStore"]

log = logging.getLogger("sluice.shared")

_U32 = struct.Struct("<I")
_TOKEN = struct.Struct(">I")  # big-endian so a token's items sort by sequence
_QUEUE_META = struct.Struct("<QQ")  # head, tail sequence numbers
_CAS_KEY = b"cas"
_USAGE = struct.Struct("<QQ")  # keys, bytes (keys plus values) of one vm_id namespace
_USAGE_PREFIX = b"usage:"
_QUEUE_TOKEN_KEY = b"queue_token"


def _space_key(vm_id: str, key: bytes) -> bytes:
    space = vm_id.encode()
    return struct.pack("<H", len(space)) + space + key


class LmdbStore:
    """One LMDB environment holding shared data and queues (open it once per process)."""

    def __init__(self, path: Path | str, *, map_size: int, max_keys: int) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_keys = max_keys
        # sync/metasync off: the data is shared between live processes, not meant to survive a
        # power cut; a write transaction then costs microseconds instead of an fsync.
        self.env = lmdb.open(
            str(self.path), map_size=map_size, max_dbs=4, sync=False, metasync=False, readahead=False, lock=True
        )
        self.data = self.env.open_db(b"data")
        self.meta = self.env.open_db(b"meta")
        self.queue_names = self.env.open_db(b"queue_names")
        self.queue_items = self.env.open_db(b"queue_items")
        self.errors = 0
        """Transactions LMDB failed (this process); each is logged."""
        # Reader slots of processes that died (a killed worker) would keep old pages from reuse.
        self.env.reader_check()

    def close(self) -> None:
        self.env.close()

    def failed(self, what: str, exc: lmdb.Error) -> WasmResult:
        """A transaction that LMDB itself refused (I/O error, a lock it could not recover)."""
        self.errors += 1
        log.error("shared data %s failed in %s: %s", what, self.path, exc)
        return WasmResult.INTERNAL_FAILURE

    def next_counter(self, txn: lmdb.Transaction, name: bytes) -> int:
        """Bump a u32 counter in `meta` inside `txn`; never returns 0."""
        raw = txn.get(name, db=self.meta)
        value = ((_U32.unpack(raw)[0] if raw is not None else 0) + 1) & 0xFFFFFFFF or 1
        txn.put(name, _U32.pack(value), db=self.meta)
        return value


class LmdbSharedData:
    """`SharedData` on an `LmdbStore`: exact CAS across processes."""

    def __init__(self, store: LmdbStore) -> None:
        self.store = store
        self.refused = 0
        """Writes of a new key refused because the store was full (this process)."""

    def get(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        with self.store.env.begin(db=self.store.data) as txn:
            raw = txn.get(_space_key(vm_id, key))
        if raw is None:
            return None
        return bytes(raw[4:]), _U32.unpack_from(raw)[0]

    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> WasmResult:
        store = self.store
        k = _space_key(vm_id, key)
        try:
            with store.env.begin(write=True, db=store.data) as txn:
                current = txn.get(k)
                if current is not None and cas != 0 and cas != _U32.unpack_from(current)[0]:
                    return WasmResult.CAS_MISMATCH
                if current is None and txn.stat(store.data)["entries"] >= store.max_keys:
                    self.refused += 1
                    return WasmResult.INTERNAL_FAILURE
                txn.put(k, _U32.pack(store.next_counter(txn, _CAS_KEY)) + value)
                if current is None:
                    self._count(txn, vm_id, 1, len(key) + len(value))
                else:
                    self._count(txn, vm_id, 0, len(value) - (len(current) - 4))
        except lmdb.MapFullError:
            self.refused += 1
            return WasmResult.INTERNAL_FAILURE
        except lmdb.Error as exc:
            return self.store.failed("set", exc)
        return WasmResult.OK

    def delete(self, vm_id: str, key: bytes, cas: int) -> WasmResult:
        try:
            with self.store.env.begin(write=True, db=self.store.data) as txn:
                k = _space_key(vm_id, key)
                current = txn.get(k)
                if current is None:
                    return WasmResult.NOT_FOUND
                if cas != 0 and cas != _U32.unpack_from(current)[0]:
                    return WasmResult.CAS_MISMATCH
                txn.delete(k)
                self._count(txn, vm_id, -1, -(len(key) + len(current) - 4))
        except lmdb.Error as exc:
            return self.store.failed("delete", exc)
        return WasmResult.OK

    def _count(self, txn: lmdb.Transaction, vm_id: str, keys: int, size: int) -> None:
        """Keep the namespace's usage beside its data, in the same write transaction: `usage`
        then answers with one read instead of a scan."""
        name = _USAGE_PREFIX + vm_id.encode()
        raw = txn.get(name, db=self.store.meta)
        have_keys, have_bytes = _USAGE.unpack(raw) if raw is not None else (0, 0)
        txn.put(name, _USAGE.pack(max(have_keys + keys, 0), max(have_bytes + size, 0)), db=self.store.meta)

    def usage(self, vm_id: str) -> tuple[int, int]:
        with self.store.env.begin(db=self.store.meta) as txn:
            raw = txn.get(_USAGE_PREFIX + vm_id.encode())
        return _USAGE.unpack(raw) if raw is not None else (0, 0)

    def keys(self, vm_id: str, prefix: bytes) -> list[bytes]:
        start = _space_key(vm_id, prefix)
        skip = len(start) - len(prefix)
        out: list[bytes] = []
        with self.store.env.begin(db=self.store.data) as txn:
            cursor = txn.cursor()
            if cursor.set_range(start):
                for k in cursor.iternext(keys=True, values=False):
                    if not k.startswith(start):
                        break
                    out.append(bytes(k[skip:]))
        return out

    def size(self, vm_id: str) -> int:
        return len(self.keys(vm_id, b""))

    def entries(self) -> int:
        """Keys stored, all vm_ids together."""
        with self.store.env.begin() as txn:
            return int(txn.stat(self.store.data)["entries"])


def _notify_address(store_path: Path, worker: str) -> str:
    tag = hashlib.sha256(str(store_path.resolve()).encode()).hexdigest()[:16]
    if sys.platform.startswith("linux"):
        return f"\0sluice-queue-{tag}-{worker}"
    return str(store_path / f"queue-{worker}.sock")


class LmdbQueues:
    """`Queues` on an `LmdbStore`, owned per worker; `worker` names this process in the fleet."""

    def __init__(self, store: LmdbStore, worker: str) -> None:
        self.store = store
        self.worker = worker
        self._local: dict[int, Callable[[int], None]] = {}
        """token -> this process's registrant (posts proxy_on_queue_ready)."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        address = _notify_address(store.path, worker)
        if not address.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)
        self._sock.bind(address)
        self.refused = 0
        """Enqueues refused because the map was full (this process)."""

    def close(self) -> None:
        self._sock.close()

    # -- the notification path -----------------------------------------------------------------
    def fileno(self) -> int:
        """Readable when another process enqueued to a queue this worker owns."""
        return self._sock.fileno()

    def drain_notifications(self) -> None:
        """Read every pending wake-up and hand each to its registrant (call from the event loop)."""
        while True:
            try:
                data = self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            if len(data) != _TOKEN.size:
                continue
            token = _TOKEN.unpack(data)[0]
            ready = self._local.get(token)
            if ready is not None:
                ready(token)

    def _wake(self, owner: str, token: int) -> None:
        if owner == self.worker:
            ready = self._local.get(token)
            if ready is not None:
                ready(token)
            return
        # Owner not running (restarting) or its socket buffer full: the items wait in LMDB and
        # its next register delivers the wake-up.
        with contextlib.suppress(OSError):
            self._sock.sendto(_TOKEN.pack(token), _notify_address(self.store.path, owner))

    # -- Queues ---------------------------------------------------------------------------------
    def register(self, vm_id: str, name: bytes, on_ready: Callable[[int], None]) -> int:
        store = self.store
        key = _space_key(vm_id, name)
        with store.env.begin(write=True) as txn:
            raw = txn.get(key, db=store.queue_names)
            token = _U32.unpack_from(raw)[0] if raw is not None else store.next_counter(txn, _QUEUE_TOKEN_KEY)
            txn.put(key, _U32.pack(token) + self.worker.encode(), db=store.queue_names)
            meta = txn.get(_TOKEN.pack(token), db=store.meta)
            if meta is None:
                txn.put(_TOKEN.pack(token), _QUEUE_META.pack(0, 0) + key, db=store.meta)
                pending = 0
            else:
                head, tail = _QUEUE_META.unpack_from(meta)
                pending = tail - head
        self._local[token] = on_ready
        if pending:
            on_ready(token)  # items arrived while no live registrant owned the queue
        return token

    def resolve(self, vm_id: str, name: bytes) -> int | None:
        with self.store.env.begin(db=self.store.queue_names) as txn:
            raw = txn.get(_space_key(vm_id, name))
        return None if raw is None else int(_U32.unpack_from(raw)[0])

    def count(self, vm_id: str) -> int:
        """Queues registered under `vm_id` (host-wide)."""
        start = _space_key(vm_id, b"")
        with self.store.env.begin(db=self.store.queue_names) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(start):
                return 0
            count = 0
            for k in cursor.iternext(keys=True, values=False):
                if not k.startswith(start):
                    break  # keys sort by namespace: the rest belong to other vm_ids
                count += 1
            return count

    def depth(self, token: int) -> int | None:
        """Items waiting in the queue, or None for an unknown token."""
        with self.store.env.begin(db=self.store.meta) as txn:
            meta = txn.get(_TOKEN.pack(token))
        if meta is None:
            return None
        head, tail = _QUEUE_META.unpack_from(meta)
        return int(tail - head)

    def enqueue(self, token: int, data: bytes) -> WasmResult:
        store = self.store
        tkey = _TOKEN.pack(token)
        try:
            with store.env.begin(write=True) as txn:
                meta = txn.get(tkey, db=store.meta)
                if meta is None:
                    return WasmResult.NOT_FOUND
                head, tail = _QUEUE_META.unpack_from(meta)
                name_key = bytes(meta[_QUEUE_META.size :])
                txn.put(tkey + struct.pack(">Q", tail), data, db=store.queue_items)
                txn.put(tkey, _QUEUE_META.pack(head, tail + 1) + name_key, db=store.meta)
                owner_raw = txn.get(name_key, db=store.queue_names)
        except lmdb.MapFullError:
            self.refused += 1
            return WasmResult.INTERNAL_FAILURE
        except lmdb.Error as exc:
            return store.failed("enqueue", exc)
        if owner_raw is not None:
            self._wake(bytes(owner_raw[4:]).decode(), token)
        return WasmResult.OK

    def dequeue(self, token: int) -> bytes | WasmResult:
        store = self.store
        tkey = _TOKEN.pack(token)
        try:
            with store.env.begin(write=True) as txn:
                meta = txn.get(tkey, db=store.meta)
                if meta is None:
                    return WasmResult.NOT_FOUND
                head, tail = _QUEUE_META.unpack_from(meta)
                if head == tail:
                    return WasmResult.EMPTY
                item_key = tkey + struct.pack(">Q", head)
                item = txn.pop(item_key, db=store.queue_items)
                txn.put(tkey, _QUEUE_META.pack(head + 1, tail) + bytes(meta[_QUEUE_META.size :]), db=store.meta)
        except lmdb.Error as exc:
            return store.failed("dequeue", exc)
        return b"" if item is None else bytes(item)

    def unbind(self, on_ready: Callable[[int], None]) -> None:
        """Forget a registrant that went away (its VM was released); the items stay."""
        for token in [t for t, cb in self._local.items() if cb is on_ready]:
            del self._local[token]
