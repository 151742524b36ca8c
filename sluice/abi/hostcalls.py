"""The `env` host functions of the proxy-wasm ABI (reference section 1).

Each function receives its wasm arguments as plain ints (pointers and sizes already unsigned),
copies what they point at out of linear memory (validating every pointer), asks the acting
context or the VM what the call means (`vm.RootContext`, `vm.StreamContext`, `vm.WasmVM`: they
own the ABI's rules) and writes the answer back as a `WasmResult`, like cpp-host's exports.cc.
Nothing raises into wasm except a deliberate trap (`HostTrap`). The union of all ABI versions is
defined; answers that differ by version switch on `vm.abi_version`.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

from . import wasi
from .api import LocalReply
from .fastcall import HostCalls, HostFunction, HostTrap, LinearMemory, NoMemory, serialize_pairs
from .headers import HeaderMap, deserialize_pairs
from .properties import split_path
from .types import StreamType, WasmResult
from .vm import WasmVM

OK = WasmResult.OK
NOT_FOUND = WasmResult.NOT_FOUND
BAD_ARGUMENT = WasmResult.BAD_ARGUMENT
INVALID_MEMORY_ACCESS = WasmResult.INVALID_MEMORY_ACCESS
UNIMPLEMENTED = WasmResult.UNIMPLEMENTED

FOREIGN_KEYS = b"sluice_shared_data_keys"
FOREIGN_DELETE = b"sluice_shared_data_delete"

I = "I"  # noqa: E741 - an unsigned i32 parameter


def _dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _text(data: bytes) -> str:
    # Names and credentials handed to a client library: never surrogates it cannot encode.
    return data.decode("utf-8", "replace")


class ProxyHostCalls(HostCalls):
    """Implementations of `env.*` for one VM: the hottest (proxy_log, reading a header value or a
    whole map, removing, adding and replacing a header, shared data, counters) are the compiled
    `fastcall.HostCalls`'s, the rest are here."""

    def __init__(self, vm: WasmVM) -> None:
        super().__init__(vm)
        self.vm = vm
        # Until the instance exists (host calls from a start section) every access fails cleanly.
        self._mem: LinearMemory | NoMemory = NoMemory()

    # -- 1.1 logging, time, ticks, configuration, status ----------------------------------------
    def proxy_get_log_level(self, out: int) -> int:
        return OK if self._mem.write_u32(out, int(self.vm.log_level())) else INVALID_MEMORY_ACCESS

    def proxy_get_current_time_nanoseconds(self, out: int) -> int:
        return OK if self._mem.write_u64(out, time.time_ns()) else INVALID_MEMORY_ACCESS

    def proxy_set_tick_period_milliseconds(self, period: int) -> int:
        root = self.vm.acting_root()
        if root is not None:
            self.vm.owner.set_tick_period(root, period)
        return OK

    def proxy_get_configuration(self, out_ptr: int, out_size: int) -> int:
        return self.vm.return_bytes(self.vm.configuration(), out_ptr, out_size)

    def proxy_get_status(self, code_ptr: int, msg_ptr: int, msg_size: int) -> int:
        root = self.vm.acting_root()
        code, message = root.status if root is not None else (0, b"")
        if not self._mem.write_u32(code_ptr, code):
            return INVALID_MEMORY_ACCESS
        return self.vm.return_bytes(message, msg_ptr, msg_size)

    # -- 1.2 buffers ------------------------------------------------------------------------------
    def proxy_get_buffer_bytes(self, btype: int, start: int, max_size: int, out_ptr: int, out_size: int) -> int:
        if btype > 9:  # 9: Higress's Redis reply
            return BAD_ARGUMENT
        buf = self.vm.buffer(btype)
        if buf is None:
            return NOT_FOUND
        size = len(buf)
        # SDKs pass huge max_size values (u32::MAX, MaxInt32): treat both as unsigned and clamp.
        end = size if start + max_size > size else start + max_size
        data = bytes(buf[start:end]) if start < size else b""
        return self.vm.return_bytes(data, out_ptr, out_size)

    def proxy_set_buffer_bytes(self, btype: int, start: int, size: int, ptr: int, length: int) -> int:
        if btype > 8:
            return BAD_ARGUMENT
        data = self._mem.read(ptr, length)
        if data is None:
            return INVALID_MEMORY_ACCESS
        return self.vm.set_buffer(btype, start, size, data)

    def proxy_get_buffer_status(self, btype: int, out_len: int, out_flags: int) -> int:
        if btype > 8:
            return BAD_ARGUMENT
        buf = self.vm.buffer(btype)
        if buf is None:
            return NOT_FOUND
        if self._mem.write_u32(out_len, len(buf)) and self._mem.write_u32(out_flags, 0):
            return OK
        return INVALID_MEMORY_ACCESS

    # -- 1.3 header maps --------------------------------------------------------------------------
    def _map(self, mtype: int, write: bool = False) -> HeaderMap | None:
        ctx = self.vm.acting()
        return ctx.header_map(mtype, write) if ctx is not None else None

    def proxy_set_header_map_pairs(self, mtype: int, ptr: int, size: int) -> int:
        if mtype > 7:
            return BAD_ARGUMENT
        data = self._mem.read(ptr, size)
        if data is None:
            return INVALID_MEMORY_ACCESS
        hmap = self._map(mtype, write=True)
        if hmap is None:
            return BAD_ARGUMENT
        return self.vm.replace_headers(hmap, data)

    def proxy_get_header_map_size(self, mtype: int, out: int) -> int:
        if mtype > 7:
            return BAD_ARGUMENT
        hmap = self._map(mtype)
        if hmap is None:
            return BAD_ARGUMENT
        # Envoy reports HeaderMap::byteSize() (keys + values), not the serialized size.
        return OK if self._mem.write_u32(out, hmap.byte_size()) else INVALID_MEMORY_ACCESS

    # -- 1.4 properties ---------------------------------------------------------------------------
    def proxy_get_property(self, pptr: int, plen: int, out_ptr: int, out_size: int) -> int:
        raw = self._mem.read(pptr, plen)
        if raw is None:
            return INVALID_MEMORY_ACCESS
        value = self.vm.property(split_path(raw))
        if value is None:
            return NOT_FOUND
        return self.vm.return_bytes(value, out_ptr, out_size)

    def proxy_set_property(self, pptr: int, plen: int, vptr: int, vlen: int) -> int:
        mem = self._mem
        raw = mem.read(pptr, plen)
        value = mem.read(vptr, vlen)
        if raw is None or value is None:
            return INVALID_MEMORY_ACCESS
        info = self.vm.stream_info()
        if info is None:
            return NOT_FOUND  # Envoy: no stream info from a root context
        segments = split_path(raw)
        if not segments:
            return BAD_ARGUMENT
        info.filter_state["\0".join(segments)] = value
        return OK

    # -- 1.5 stream control and local responses ---------------------------------------------------
    def _stream_action(self, stype: int, close: bool) -> int:
        ctx = self.vm.acting()
        if ctx is None:
            return BAD_ARGUMENT if stype > StreamType.UPSTREAM else NOT_FOUND
        return ctx.stream_action(stype, close)

    def proxy_continue_stream(self, stype: int) -> int:
        return self._stream_action(stype, close=False)

    def proxy_close_stream(self, stype: int) -> int:
        return self._stream_action(stype, close=True)

    def proxy_continue_request(self) -> int:
        return self._stream_action(StreamType.HTTP_REQUEST, close=False)

    def proxy_continue_response(self) -> int:
        return self._stream_action(StreamType.HTTP_RESPONSE, close=False)

    def proxy_clear_route_cache(self) -> int:
        return OK  # routes are matched after the request-headers phase, so nothing is cached

    def proxy_send_local_response(
        self, status: int, dptr: int, dlen: int, bptr: int, blen: int, hptr: int, hlen: int, grpc: int
    ) -> int:
        mem = self._mem
        details = mem.read(dptr, dlen)
        body = mem.read(bptr, blen)
        headers = mem.read(hptr, hlen)
        if details is None or body is None or headers is None:
            return INVALID_MEMORY_ACCESS
        ctx = self.vm.acting()
        if ctx is None:
            return NOT_FOUND
        reply = LocalReply(
            status=status,
            body=body,
            headers=tuple(deserialize_pairs(headers)),
            details=_dec(details).replace(" ", "_"),
            grpc_status=grpc if 0 <= grpc <= 16 else None,
        )
        return ctx.send_local_response(reply)

    # -- 1.6 HTTP callouts ------------------------------------------------------------------------
    def proxy_http_call(
        self, uptr: int, ulen: int, hptr: int, hlen: int, bptr: int, blen: int,
        tptr: int, tlen: int, timeout_ms: int, out_token: int,
    ) -> int:
        mem = self._mem
        upstream = mem.read(uptr, ulen)
        headers = mem.read(hptr, hlen)
        body = mem.read(bptr, blen)
        trailers = mem.read(tptr, tlen)
        if upstream is None or headers is None or body is None or trailers is None:
            return INVALID_MEMORY_ACCESS
        if not mem.write_u32(out_token, 0):
            return INVALID_MEMORY_ACCESS
        root = self.vm.acting_root()
        result = (
            root.http_call(_dec(upstream), HeaderMap.deserialize(headers), body,
                           HeaderMap.deserialize(trailers), timeout_ms)
            if root is not None else BAD_ARGUMENT
        )
        if isinstance(result, WasmResult):
            return result
        mem.write_u32(out_token, result)
        return OK

    # -- Higress's Redis calls (ABI 0.2.100; docs/abi.md) ----------------------------------------
    def proxy_redis_init(
        self, cptr: int, clen: int, uptr: int, ulen: int, pptr: int, plen: int, timeout_ms: int
    ) -> int:
        mem = self._mem
        cluster, username, password = mem.read(cptr, clen), mem.read(uptr, ulen), mem.read(pptr, plen)
        if cluster is None or username is None or password is None:
            return INVALID_MEMORY_ACCESS
        root = self.vm.acting_root()
        if root is None:
            return BAD_ARGUMENT
        return root.redis_init(_text(cluster), _text(username), _text(password), timeout_ms)

    def proxy_redis_call(self, cptr: int, clen: int, qptr: int, qlen: int, out_token: int) -> int:
        mem = self._mem
        cluster, query = mem.read(cptr, clen), mem.read(qptr, qlen)
        if cluster is None or query is None:
            return INVALID_MEMORY_ACCESS
        if not mem.write_u32(out_token, 0):
            return INVALID_MEMORY_ACCESS
        root = self.vm.acting_root()
        result = root.redis_call(_text(cluster), query) if root is not None else BAD_ARGUMENT
        if isinstance(result, WasmResult):
            return result
        mem.write_u32(out_token, result)
        return OK

    # -- 1.7 gRPC: not offered ----------------------------------------------------------------------
    def proxy_grpc_call(self, *_: int) -> int:
        return UNIMPLEMENTED

    def proxy_grpc_stream(self, *_: int) -> int:
        return UNIMPLEMENTED

    def proxy_grpc_send(self, *_: int) -> int:
        return UNIMPLEMENTED

    def proxy_grpc_cancel(self, *_: int) -> int:
        return UNIMPLEMENTED

    def proxy_grpc_close(self, *_: int) -> int:
        return UNIMPLEMENTED

    # -- 1.8 shared data: get and set are compiled (`fastcall.HostCalls`) -------------------------
    # -- 1.9 shared queues -------------------------------------------------------------------------
    def proxy_register_shared_queue(self, nptr: int, nlen: int, out_token: int) -> int:
        name = self._mem.read(nptr, nlen)
        if name is None:
            return INVALID_MEMORY_ACCESS
        root = self.vm.acting_root()
        if root is None:
            return BAD_ARGUMENT
        token = self.vm.register_queue(root, name)
        if isinstance(token, WasmResult):
            return token
        return OK if self._mem.write_u32(out_token, token) else INVALID_MEMORY_ACCESS

    def proxy_resolve_shared_queue(self, vptr: int, vlen: int, nptr: int, nlen: int, out_token: int) -> int:
        vm_id = self._mem.read(vptr, vlen)
        name = self._mem.read(nptr, nlen)
        if vm_id is None or name is None:
            return INVALID_MEMORY_ACCESS
        token = self.vm.resolve_queue(_dec(vm_id), name)
        if token is None:
            return NOT_FOUND
        return OK if self._mem.write_u32(out_token, token) else INVALID_MEMORY_ACCESS

    def proxy_enqueue_shared_queue(self, token: int, ptr: int, size: int) -> int:
        data = self._mem.read(ptr, size)
        if data is None:
            return INVALID_MEMORY_ACCESS
        return self.vm.enqueue(token, data)

    def proxy_dequeue_shared_queue(self, token: int, out_ptr: int, out_size: int) -> int:
        item = self.vm.services.queues.dequeue(token)
        if isinstance(item, WasmResult):
            return item
        return self.vm.return_bytes(item, out_ptr, out_size)

    # -- 1.10 metrics ------------------------------------------------------------------------------
    def proxy_define_metric(self, mtype: int, nptr: int, nlen: int, out_id: int) -> int:
        name = self._mem.read(nptr, nlen)
        if name is None:
            return INVALID_MEMORY_ACCESS
        metric_id = self.vm.define_metric(mtype, _dec(name))
        if isinstance(metric_id, WasmResult):
            return metric_id
        return OK if self._mem.write_u32(out_id, metric_id) else INVALID_MEMORY_ACCESS

    def proxy_get_metric(self, metric_id: int, out: int) -> int:
        value = self.vm.metrics.get(metric_id)
        if isinstance(value, WasmResult):
            return value
        return OK if self._mem.write_u64(out, value) else INVALID_MEMORY_ACCESS

    # -- 1.11 context control, FFI -----------------------------------------------------------------
    def proxy_set_effective_context(self, context_id: int) -> int:
        ctx = self.vm.contexts.get(context_id)
        if ctx is None or ctx.deleted:
            return BAD_ARGUMENT
        self.vm.frames[-1].effective = ctx
        return OK

    def proxy_done(self) -> int:
        root = self.vm.acting_root()
        return root.done() if root is not None else NOT_FOUND

    def proxy_call_foreign_function(
        self, nptr: int, nlen: int, aptr: int, alen: int, out_ptr: int, out_size: int
    ) -> int:
        mem = self._mem
        name = mem.read(nptr, nlen)
        args = mem.read(aptr, alen)
        if name is None or args is None:
            return INVALID_MEMORY_ACCESS
        shared = self.vm.services.shared_data
        vm_id = self.vm.spec.vm_id
        if name == FOREIGN_KEYS:
            keys = shared.keys(vm_id, args)
            result = serialize_pairs([(k, b"") for k in keys])
            if out_ptr == 0 and out_size == 0:
                return OK
            return self.vm.return_bytes(result, out_ptr, out_size)
        if name == FOREIGN_DELETE:
            if len(args) < 4:
                return BAD_ARGUMENT
            (cas,) = struct.unpack_from("<I", args, 0)
            status = self.vm.delete_shared(args[4:], cas)
            if status == OK and not (out_ptr == 0 and out_size == 0):
                return self.vm.return_bytes(b"", out_ptr, out_size)
            return status
        return NOT_FOUND

    # -- 1.12 other env imports --------------------------------------------------------------------
    def emscripten_notify_memory_growth(self, _index: int) -> None:
        return None

    def pthread_equal(self, a: int, b: int) -> int:
        return 1 if a == b else 0

    def abort(self, msg: int, file: int, line: int, column: int) -> None:
        # AssemblyScript's default abort handler (modules not built with --use abort=...).
        raise HostTrap(f"abort called at line {line}:{column}")

    def seed(self) -> float:
        return float(time.time_ns() & 0xFFFFFFFFFFFF)

    def trace(self, ptr: int, n: int, *values: float) -> None:
        return None


# Every env import sluice provides: (name, params, results). "I" = unsigned i32 (pointer, size,
# id), "i" = signed i32, "q"/"Q" = signed/unsigned i64, "d" = f64.
ENV_FUNCTIONS: list[tuple[str, str, str]] = [
    ("proxy_log", "iII", "i"),
    ("proxy_get_log_level", "I", "i"),
    ("proxy_get_current_time_nanoseconds", "I", "i"),
    ("proxy_set_tick_period_milliseconds", "I", "i"),
    ("proxy_get_configuration", "II", "i"),
    ("proxy_get_status", "III", "i"),
    ("proxy_get_buffer_bytes", "IIIII", "i"),
    ("proxy_set_buffer_bytes", "IIIII", "i"),
    ("proxy_get_buffer_status", "III", "i"),
    ("proxy_get_header_map_pairs", "III", "i"),
    ("proxy_set_header_map_pairs", "III", "i"),
    ("proxy_get_header_map_value", "IIIII", "i"),
    ("proxy_add_header_map_value", "IIIII", "i"),
    ("proxy_replace_header_map_value", "IIIII", "i"),
    ("proxy_remove_header_map_value", "III", "i"),
    ("proxy_get_header_map_size", "II", "i"),
    ("proxy_get_property", "IIII", "i"),
    ("proxy_set_property", "IIII", "i"),
    ("proxy_continue_stream", "I", "i"),
    ("proxy_close_stream", "I", "i"),
    ("proxy_continue_request", "", "i"),
    ("proxy_continue_response", "", "i"),
    ("proxy_clear_route_cache", "", "i"),
    ("proxy_send_local_response", "IIIIIIIi", "i"),
    ("proxy_http_call", "IIIIIIIIII", "i"),
    ("proxy_grpc_call", "IIIIIIIIIIII", "i"),
    ("proxy_grpc_stream", "IIIIIIIII", "i"),
    ("proxy_grpc_send", "IIII", "i"),
    ("proxy_grpc_cancel", "I", "i"),
    ("proxy_grpc_close", "I", "i"),
    # (cluster, username, password as ptr/len pairs, timeout_ms) and (cluster, query, out callout id)
    ("proxy_redis_init", "IIIIIII", "i"),
    ("proxy_redis_call", "IIIII", "i"),
    ("proxy_get_shared_data", "IIIII", "i"),
    ("proxy_set_shared_data", "IIIII", "i"),
    ("proxy_register_shared_queue", "III", "i"),
    ("proxy_resolve_shared_queue", "IIIII", "i"),
    ("proxy_enqueue_shared_queue", "III", "i"),
    ("proxy_dequeue_shared_queue", "III", "i"),
    ("proxy_define_metric", "IIII", "i"),
    ("proxy_increment_metric", "Iq", "i"),
    ("proxy_record_metric", "IQ", "i"),
    ("proxy_get_metric", "II", "i"),
    ("proxy_set_effective_context", "I", "i"),
    ("proxy_done", "", "i"),
    ("proxy_call_foreign_function", "IIIIII", "i"),
    ("emscripten_notify_memory_growth", "i", ""),
    ("pthread_equal", "ii", "i"),
    ("abort", "IIII", ""),
    ("seed", "", "d"),
    ("trace", "IIddddd", ""),
]

HOST_FUNCTIONS: list[HostFunction] = [HostFunction("env", n, p, r) for n, p, r in ENV_FUNCTIONS] + [
    HostFunction(module, n, p, r) for module in wasi.MODULES for n, p, r in wasi.FUNCTIONS
]


def bind_host_functions(vm: WasmVM) -> tuple[list[Callable[..., Any]], Callable[[LinearMemory], None]]:
    """The VM's implementations, in `HOST_FUNCTIONS` order, and a setter for its memory."""
    proxy = ProxyHostCalls(vm)
    system = wasi.Wasi(vm)
    impls: list[Callable[..., Any]] = [getattr(proxy, n) for n, _, _ in ENV_FUNCTIONS]
    for _module in wasi.MODULES:
        impls.extend(getattr(system, n) for n, _, _ in wasi.FUNCTIONS)

    def bind_memory(memory: LinearMemory) -> None:
        proxy._mem = memory
        proxy.bind_memory(memory)

    return impls, bind_memory

