"""Higress's Redis host calls (ABI 0.2.100 extension), documented in docs/abi.md.

    proxy_redis_init(cluster_ptr, cluster_size, username_ptr, username_size,
                     password_ptr, password_size, timeout_ms: u32) -> WasmResult
    proxy_redis_call(cluster_ptr, cluster_size, query_ptr, query_size, token_ptr: *u32) -> WasmResult
    proxy_on_redis_call_response(root_context_id, token, status: i32, response_size: i32)   [export]
    proxy_get_buffer_bytes(9 = REDIS_CALL_RESPONSE, ...)   the reply, during that callback only

A filter sends one RESP-encoded command (`query`) to a `type: redis` cluster; the host answers
later through `proxy_on_redis_call_response` on the root context that made the call, with the
reply's raw RESP bytes in buffer 9 and `status` 0, or `status` != 0 (1 = the call failed: no
connection, a broken connection; 2 = timeout) and no buffer. A stream that paused waiting for it
is resumed by the filter itself (`proxy_continue_stream`), as with an HTTP callout.

This module keeps the call logic out of the host-call table: `hostcalls.ProxyHostCalls` binds
`proxy_redis_init` / `proxy_redis_call` to the functions here. The proxy side is a
`RedisHost` (sluice/proxy/redis_host.py); a host without one answers UNIMPLEMENTED.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .fastcall import WasmTrap
from .types import WasmResult

if TYPE_CHECKING:
    from .fastcall import LinearMemory, NoMemory
    from .vm import RootContext, WasmVM

__all__ = [
    "REDIS_CALL_FAILED",
    "REDIS_CALL_RESPONSE_BUFFER",
    "REDIS_CALL_TIMEOUT",
    "RedisHost",
    "proxy_redis_call",
    "proxy_redis_init",
    "response_buffer",
]

REDIS_CALL_RESPONSE_BUFFER = 9
"""Higress's BufferType for the reply being delivered (proxy-wasm's own types stop at 8)."""
REDIS_CALL_FAILED = 1
REDIS_CALL_TIMEOUT = 2
CALLBACK = "proxy_on_redis_call_response"


@runtime_checkable
class RedisHost(Protocol):
    """What an `abi.Host` offers to serve the Redis host calls (the proxy's `Services`)."""

    def redis_init(self, cluster: str, username: str, password: str, timeout_s: float | None) -> bool:
        """Whether `cluster` is a Redis cluster this host can reach (credentials override the config's)."""
        ...

    def redis_call(
        self, cluster: str, query: bytes, on_response: Callable[[bytes | None, int], None]
    ) -> bool:
        """Send one RESP command; False at once if the cluster is unknown.

        Otherwise `on_response(reply_resp_bytes, 0)` or `on_response(None, status)` later, exactly
        once, never before this returns.
        """
        ...


_inited: weakref.WeakKeyDictionary[WasmVM, set[str]] = weakref.WeakKeyDictionary()
"""Clusters each VM initialised (a replaced VM initialises again in its configure)."""
_pending: weakref.WeakKeyDictionary[RootContext, set[int]] = weakref.WeakKeyDictionary()
_delivering: weakref.WeakKeyDictionary[RootContext, bytes] = weakref.WeakKeyDictionary()


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def proxy_redis_init(
    mem: LinearMemory | NoMemory, vm: WasmVM,
    cptr: int, clen: int, uptr: int, ulen: int, pptr: int, plen: int, timeout_ms: int,
) -> int:
    cluster, username, password = mem.read(cptr, clen), mem.read(uptr, ulen), mem.read(pptr, plen)
    if cluster is None or username is None or password is None:
        return WasmResult.INVALID_MEMORY_ACCESS
    host = vm.host
    if not isinstance(host, RedisHost):
        return WasmResult.UNIMPLEMENTED
    name = _text(cluster)
    if not host.redis_init(name, _text(username), _text(password), timeout_ms / 1000 if timeout_ms else None):
        return WasmResult.BAD_ARGUMENT
    _inited.setdefault(vm, set()).add(name)
    return WasmResult.OK


def proxy_redis_call(
    mem: LinearMemory | NoMemory, vm: WasmVM, cptr: int, clen: int, qptr: int, qlen: int, out_token: int
) -> int:
    cluster, query = mem.read(cptr, clen), mem.read(qptr, qlen)
    if cluster is None or query is None:
        return WasmResult.INVALID_MEMORY_ACCESS
    if not mem.write_u32(out_token, 0):
        return WasmResult.INVALID_MEMORY_ACCESS
    host = vm.host
    if not isinstance(host, RedisHost):
        return WasmResult.UNIMPLEMENTED
    name = _text(cluster)
    root = vm.acting_root()
    if root is None or name not in _inited.get(vm, ()):
        return WasmResult.BAD_ARGUMENT  # Higress: a cluster must be initialised first
    token = vm.new_token()
    pending = _pending.setdefault(root, set())
    pending.add(token)
    if not host.redis_call(name, query, lambda reply, status: _deliver(vm, root, token, reply, status)):
        pending.discard(token)
        return WasmResult.BAD_ARGUMENT
    mem.write_u32(out_token, token)
    return WasmResult.OK


def response_buffer(vm: WasmVM) -> bytes | None:
    """Buffer 9: the reply being delivered to the acting root, only during its callback."""
    root = vm.acting_root()
    return None if root is None else _delivering.get(root)


def _deliver(vm: WasmVM, root: RootContext, token: int, reply: bytes | None, status: int) -> None:
    pending = _pending.get(root)
    if pending is None or token not in pending:
        return
    pending.discard(token)
    if root.deleted or vm.dead is not None or not vm.has(CALLBACK):
        return
    if reply is not None:
        _delivering[root] = reply
    try:
        vm.call(CALLBACK, root, root.id, token, 0 if reply is not None else status, len(reply or b""))
    except WasmTrap as exc:
        # The same consequences as a trap in proxy_on_http_call_response.
        owner = vm.runtime_hooks
        owner._on_trap(vm, exc, CALLBACK)  # type: ignore[attr-defined]  # noqa: SLF001
        owner._fail_paused_streams(vm)  # type: ignore[attr-defined]  # noqa: SLF001
    finally:
        _delivering.pop(root, None)
