"""Shared key/value data and shared queues, scoped by `vm_id` and living outside any VM.

`SharedData` and `Queues` are the small interfaces a backend implements; `InMemorySharedData` and
`SharedQueues` serve one process, `shared_lmdb` every worker process of a host. Semantics follow
cpp-host exactly (reference 1.8/1.9): one global CAS counter that never hands out 0, `cas == 0`
writes unconditionally, a missing key ignores the CAS.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from typing import Protocol

from .types import WasmResult


class SharedData(Protocol):
    def get(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        """Value and CAS of `key`, or None if absent."""
        ...

    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> WasmResult:
        """OK or CAS_MISMATCH."""
        ...

    def delete(self, vm_id: str, key: bytes, cas: int) -> WasmResult:
        """OK, NOT_FOUND or CAS_MISMATCH (sluice extension, reached through a foreign function)."""
        ...

    def keys(self, vm_id: str, prefix: bytes) -> list[bytes]:
        """Keys starting with `prefix` (sluice extension, reached through a foreign function)."""
        ...

    def usage(self, vm_id: str) -> tuple[int, int]:
        """Keys in `vm_id` and their bytes (keys plus values): what the filter limits bound."""
        ...


class InMemorySharedData:
    def __init__(self) -> None:
        self._spaces: dict[str, dict[bytes, tuple[bytes, int]]] = {}
        self._bytes: dict[str, int] = {}
        self._cas = 0

    def _next_cas(self) -> int:
        self._cas = (self._cas + 1) & 0xFFFFFFFF or 1
        return self._cas

    def get(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        space = self._spaces.get(vm_id)
        return None if space is None else space.get(key)

    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> WasmResult:
        space = self._spaces.setdefault(vm_id, {})
        current = space.get(key)
        if current is not None and cas != 0 and cas != current[1]:
            return WasmResult.CAS_MISMATCH
        old = len(key) + len(current[0]) if current is not None else 0
        self._bytes[vm_id] = self._bytes.get(vm_id, 0) + len(key) + len(value) - old
        space[key] = (value, self._next_cas())
        return WasmResult.OK

    def delete(self, vm_id: str, key: bytes, cas: int) -> WasmResult:
        space = self._spaces.get(vm_id)
        current = None if space is None else space.get(key)
        if space is None or current is None:
            return WasmResult.NOT_FOUND
        if cas != 0 and cas != current[1]:
            return WasmResult.CAS_MISMATCH
        del space[key]
        self._bytes[vm_id] -= len(key) + len(current[0])
        return WasmResult.OK

    def keys(self, vm_id: str, prefix: bytes) -> list[bytes]:
        return [k for k in self._spaces.get(vm_id, {}) if k.startswith(prefix)]

    def usage(self, vm_id: str) -> tuple[int, int]:
        return len(self._spaces.get(vm_id, {})), self._bytes.get(vm_id, 0)

    def size(self, vm_id: str) -> int:
        return len(self._spaces.get(vm_id, {}))


class Queues(Protocol):
    """Shared queues: `SharedQueues` serves one process, `shared_lmdb.LmdbQueues` a host."""

    def register(self, vm_id: str, name: bytes, on_ready: Callable[[int], None]) -> int: ...

    def resolve(self, vm_id: str, name: bytes) -> int | None: ...

    def enqueue(self, token: int, data: bytes) -> WasmResult: ...

    def dequeue(self, token: int) -> bytes | WasmResult: ...

    def unbind(self, on_ready: Callable[[int], None]) -> None: ...

    def count(self, vm_id: str) -> int:
        """Queues registered under `vm_id`."""
        ...

    def depth(self, token: int) -> int | None:
        """Items waiting in the queue, or None for an unknown token."""
        ...


@dataclasses.dataclass
class _Queue:
    vm_id: str
    name: bytes
    items: deque[bytes] = dataclasses.field(default_factory=deque)
    on_ready: Callable[[int], None] | None = None
    """Posts `proxy_on_queue_ready(root, token)` to the registrant; rebound on every register."""


class SharedQueues:
    """Shared queues keyed by (vm_id, name); tokens are process-global, non-zero."""

    def __init__(self) -> None:
        self._by_token: dict[int, _Queue] = {}
        self._by_name: dict[tuple[str, bytes], int] = {}
        self._next = 0

    def register(self, vm_id: str, name: bytes, on_ready: Callable[[int], None]) -> int:
        token = self._by_name.get((vm_id, name))
        if token is None:
            self._next += 1
            token = self._next
            self._by_name[(vm_id, name)] = token
            self._by_token[token] = _Queue(vm_id, name)
        self._by_token[token].on_ready = on_ready
        return token

    def resolve(self, vm_id: str, name: bytes) -> int | None:
        return self._by_name.get((vm_id, name))

    def count(self, vm_id: str) -> int:
        """Queues registered under `vm_id`."""
        return sum(1 for owner, _ in self._by_name if owner == vm_id)

    def depth(self, token: int) -> int | None:
        """Items waiting in the queue, or None for an unknown token."""
        queue = self._by_token.get(token)
        return None if queue is None else len(queue.items)

    def enqueue(self, token: int, data: bytes) -> WasmResult:
        queue = self._by_token.get(token)
        if queue is None:
            return WasmResult.NOT_FOUND
        queue.items.append(data)
        if queue.on_ready is not None:
            queue.on_ready(token)
        return WasmResult.OK

    def dequeue(self, token: int) -> bytes | WasmResult:
        queue = self._by_token.get(token)
        if queue is None:
            return WasmResult.NOT_FOUND
        if not queue.items:
            return WasmResult.EMPTY
        return queue.items.popleft()

    def unbind(self, on_ready: Callable[[int], None]) -> None:
        """Forget a registrant that went away (its VM was released); the data stays."""
        for queue in self._by_token.values():
            if queue.on_ready is on_ready:
                queue.on_ready = None
