"""The order and arguments of the callbacks the host makes, observed by a hand-written module.

`tracer()` writes a WAT module that logs (proxy_log, level info) the name and arguments of every
callback it receives, e.g. `proxy_on_request_headers(2,5,0)`, plus a few probe lines (buffers,
properties, headers it read). The tests compile it with `wasmtime.wat2wasm` and compare the exact
sequence with the one Envoy uses (reference sections 2 and 6).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from aiohttp import web
from hosting import FilterRig, Recorder

from sluice import abi
from sluice.abi import FilterStatus, HeaderMap, LogLevel, PluginState

SCRATCH = 4096
OUT_PTR = 1024
OUT_SIZE = 1028
HEAP = 65536


def _wat_bytes(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


class _Data:
    """Static strings laid out from address 16; `ref(s)` -> (offset, length)."""

    def __init__(self) -> None:
        self.offset = 16
        self.items: dict[bytes, int] = {}

    def ref(self, value: str | bytes) -> tuple[int, int]:
        raw = value.encode() if isinstance(value, str) else value
        if raw not in self.items:
            self.items[raw] = self.offset
            self.offset += len(raw) + 1
            assert self.offset < OUT_PTR
        return self.items[raw], len(raw)

    def segments(self) -> str:
        return "\n".join(f'  (data (i32.const {off}) "{_wat_bytes(raw)}")' for raw, off in self.items.items())


def tracer(
    *,
    abi_version: str = "0_2_0",
    allocator: tuple[str, ...] = ("malloc",),
    init: tuple[str, ...] = (),
    extra_imports: str = "",
    marker: bool = True,
) -> str:
    """The tracing module's WAT. `init` may contain "start" (start section), "_initialize",
    "main", "_start"; each sets a bit of global $init (1, 2, 4, 8) and, except the start
    section (which runs before the host has the module's memory), logs its name."""
    legacy = abi_version == "0_1_0"
    d = _Data()

    def emit(name: str, nargs: int) -> str:
        off, length = d.ref(name)
        args = " ".join(f"(local.get {i})" for i in range(nargs)) + " (i32.const 0)" * (5 - nargs)
        return f"(call $emit (i32.const {off}) (i32.const {length}) (i32.const {nargs}) {args})"

    def probe(prefix: str, status: str) -> str:
        """Log `<prefix><status>:<returned bytes>` after a returned-buffer host call."""
        off, length = d.ref(prefix)
        return (f"(call $probe (i32.const {off}) (i32.const {length}) {status} "
                f"(i32.load (i32.const {OUT_PTR})) (i32.load (i32.const {OUT_SIZE})))")

    def get_buffer(btype: int, max_size: str) -> str:
        return (f"(call $get_buffer (i32.const {btype}) (i32.const 0) {max_size} "
                f"(i32.const {OUT_PTR}) (i32.const {OUT_SIZE}))")

    def get_header(name: str) -> str:
        off, length = d.ref(name)
        return (f"(call $get_header (i32.const 0) (i32.const {off}) (i32.const {length}) "
                f"(i32.const {OUT_PTR}) (i32.const {OUT_SIZE}))")

    def clear_out() -> str:
        return (f"(i32.store (i32.const {OUT_PTR}) (i32.const 0)) "
                f"(i32.store (i32.const {OUT_SIZE}) (i32.const 0))")

    root_id_off, root_id_len = d.ref("plugin_root_id")
    reply_body_off, reply_body_len = d.ref("nope")
    reply_hdrs = (b"\x01\x00\x00\x00" + b"\x03\x00\x00\x00" + b"\x01\x00\x00\x00" + b"x-r\x00" + b"1\x00")
    reply_hdrs_off, reply_hdrs_len = d.ref(reply_hdrs)
    details_off, details_len = d.ref("by tracer")
    call_hdrs = [(b":method", b"POST"), (b":path", b"/cb"), (b":authority", b"up")]
    call_hdrs_raw = len(call_hdrs).to_bytes(4, "little") + b"".join(
        len(k).to_bytes(4, "little") + len(v).to_bytes(4, "little") for k, v in call_hdrs
    ) + b"".join(k + b"\0" + v + b"\0" for k, v in call_hdrs)
    call_hdrs_off, call_hdrs_len = d.ref(call_hdrs_raw)
    call_body_off, call_body_len = d.ref("ping")
    empty_map_off, _ = d.ref(b"\0\0\0\0")

    get_root_id = (f"(call $get_property (i32.const {root_id_off}) (i32.const {root_id_len}) "
                   f"(i32.const {OUT_PTR}) (i32.const {OUT_SIZE}))")
    funcs: list[str] = []
    # -- context create: the root probes plugin_root_id and reports the init mask.
    funcs.append(f"""
  (func (export "proxy_on_context_create") (param i32 i32)
    {emit("proxy_on_context_create", 2)}
    (if (i32.eqz (local.get 1)) (then
      {clear_out()}
      {probe("plugin_root_id=", get_root_id)}
      (call $emit (i32.const {d.ref("init")[0]}) (i32.const 4) (i32.const 1) (global.get $init)
        (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))))""")
    if legacy:
        funcs.append(f"""
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    {emit("proxy_on_vm_start", 2)}
    {clear_out()}
    {probe("get_configuration=", f"(call $get_configuration (i32.const {OUT_PTR}) (i32.const {OUT_SIZE}))")}
    (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    {emit("proxy_on_configure", 2)}
    {clear_out()}
    {probe("get_configuration=", f"(call $get_configuration (i32.const {OUT_PTR}) (i32.const {OUT_SIZE}))")}
    (drop (call $set_tick (i32.const 10)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (if (global.get $paused) (then
      {emit("proxy_on_tick", 1)}
      (call $emit (i32.const {d.ref("effective")[0]}) (i32.const 9) (i32.const 1)
        (call $set_effective (global.get $paused)) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
      (call $emit (i32.const {d.ref("continue_request")[0]}) (i32.const 16) (i32.const 1)
        (call $continue_request) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
      (global.set $paused (i32.const 0)))))""")
    else:
        funcs.append(f"""
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    {emit("proxy_on_vm_start", 2)}
    {clear_out()}
    {probe("vm_config=", get_buffer(6, "(local.get 1)"))}
    {clear_out()}
    {probe("plugin_config_at_vm_start=", get_buffer(7, "(i32.const 100)"))}
    (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    {emit("proxy_on_configure", 2)}
    (if (local.get 1) (then
      {clear_out()}
      {probe("plugin_config=", get_buffer(7, "(local.get 1)"))}))
    (i32.const 1))""")
    # -- stream callbacks
    if legacy:
        funcs.append(f"""
  (func (export "proxy_on_request_headers") (param i32 i32) (result i32)
    {emit("proxy_on_request_headers", 2)}
    (i32.store (i32.const {OUT_PTR}) (i32.const 77)) (i32.store (i32.const {OUT_SIZE}) (i32.const 77))
    {probe("x-missing=", get_header("x-missing"))}
    (call $emit (i32.const {d.ref("out")[0]}) (i32.const 3) (i32.const 2)
      (i32.load (i32.const {OUT_PTR})) (i32.load (i32.const {OUT_SIZE}))
      (i32.const 0) (i32.const 0) (i32.const 0))
    (global.set $paused (local.get 0))
    (i32.const 1))
  (func (export "proxy_on_response_headers") (param i32 i32) (result i32)
    {emit("proxy_on_response_headers", 2)}
    (i32.const 0))""")
    else:
        funcs.append(f"""
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    {emit("proxy_on_request_headers", 3)}
    (if (i32.eqz {get_header("x-call")}) (then
      ;; x-call holds the upstream (host:port): call it, hold the request
      (i32.store (i32.const 1040) (i32.const 0))
      (call $emit (i32.const {d.ref("http_call")[0]}) (i32.const 9) (i32.const 2)
        (call $http_call (i32.load (i32.const {OUT_PTR})) (i32.load (i32.const {OUT_SIZE}))
          (i32.const {call_hdrs_off}) (i32.const {call_hdrs_len})
          (i32.const {call_body_off}) (i32.const {call_body_len})
          (i32.const {empty_map_off}) (i32.const 4) (i32.const 5000) (i32.const 1040))
        (i32.load (i32.const 1040)) (i32.const 0) (i32.const 0) (i32.const 0))
      (global.set $paused (local.get 0))
      (return (i32.const 1))))
    (if (i32.eqz {get_header("x-reply")}) (then
      (drop (call $send_local_response (i32.const 403)
        (i32.const {details_off}) (i32.const {details_len})
        (i32.const {reply_body_off}) (i32.const {reply_body_len})
        (i32.const {reply_hdrs_off}) (i32.const {reply_hdrs_len}) (i32.const -1)))))
    (i32.const 0))  ;; Continue: the host must override it to stop after a local reply
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    {emit("proxy_on_response_headers", 3)}
    (i32.const 0))""")
    funcs.append(f"""
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    {emit("proxy_on_http_call_response", 5)}
    {clear_out()}
    {probe("body=", get_buffer(4, "(local.get 3)"))}
    (call $emit (i32.const {d.ref("effective")[0]}) (i32.const 9) (i32.const 1)
      (call $set_effective (global.get $paused)) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
    (call $emit (i32.const {d.ref("continue_stream")[0]}) (i32.const 15) (i32.const 1)
      (call $continue_stream (i32.const 0)) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
    (global.set $paused (i32.const 0))
    (if (global.get $done_pending) (then
      (call $emit (i32.const {d.ref("proxy_done")[0]}) (i32.const 10) (i32.const 1)
        (call $proxy_done) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    {emit("proxy_on_request_body", 3)} (i32.const 0))
  (func (export "proxy_on_request_trailers") (param i32 i32) (result i32)
    {emit("proxy_on_request_trailers", 2)} (i32.const 0))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
    {emit("proxy_on_response_body", 3)} (i32.const 0))
  (func (export "proxy_on_response_trailers") (param i32 i32) (result i32)
    {emit("proxy_on_response_trailers", 2)} (i32.const 0))
  (func (export "proxy_on_log") (param i32)
    {emit("proxy_on_log", 1)})
  (func (export "proxy_on_done") (param i32) (result i32)
    {emit("proxy_on_done", 1)}
    ;; the root waits for an outstanding callout before it lets the host delete it
    (if (i32.and (i32.eq (local.get 0) (i32.const 1)) (i32.ne (global.get $paused) (i32.const 0))) (then
      (global.set $done_pending (i32.const 1))
      (return (i32.const 0))))
    (i32.const 1))
  (func (export "proxy_on_delete") (param i32)
    {emit("proxy_on_delete", 1)})""")
    for name in allocator:
        funcs.append(f"""
  (func (export "{name}") (param i32) (result i32)
    (local $p i32)
    {emit(name, 1)}
    (local.set $p (global.get $heap))
    (global.set $heap
      (i32.and (i32.add (i32.add (global.get $heap) (local.get 0)) (i32.const 7)) (i32.const -8)))
    (local.get $p))""")
    if "start" in init:
        funcs.append("""
  (func $start_section (global.set $init (i32.or (global.get $init) (i32.const 1))))
  (start $start_section)""")
    if "_initialize" in init:
        funcs.append(f"""
  (func (export "_initialize")
    {emit("_initialize", 0)}
    (global.set $init (i32.or (global.get $init) (i32.const 2))))""")
    if "main" in init:
        funcs.append(f"""
  (func (export "main") (param i32 i32) (result i32)
    {emit("main", 2)}
    (global.set $init (i32.or (global.get $init) (i32.const 4)))
    (i32.const 0))""")
    if "_start" in init:
        funcs.append(f"""
  (func (export "_start")
    {emit("_start", 0)}
    (global.set $init (i32.or (global.get $init) (i32.const 8))))""")

    marker_export = f'(func (export "proxy_abi_version_{abi_version}"))' if marker else ""
    return f"""(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $send_local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_configuration" (func $get_configuration (param i32 i32) (result i32)))
  (import "env" "proxy_continue_request" (func $continue_request (result i32)))
  (import "env" "proxy_set_effective_context" (func $set_effective (param i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $set_tick (param i32) (result i32)))
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue_stream (param i32) (result i32)))
  (import "env" "proxy_done" (func $proxy_done (result i32)))
  {extra_imports}
  (memory (export "memory") 4)
  (global $heap (mut i32) (i32.const {HEAP}))
  (global $init (mut i32) (i32.const 0))
  (global $paused (mut i32) (i32.const 0))
  (global $done_pending (mut i32) (i32.const 0))
  {marker_export}
{d.segments()}
  ;; decimal digits of unsigned $v at $p; returns the end
  (func $utoa (param $v i32) (param $p i32) (result i32)
    (local $t i32) (local $n i32)
    (local.set $t (local.get $v))
    (loop $count
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (local.set $t (i32.div_u (local.get $t) (i32.const 10)))
      (br_if $count (local.get $t)))
    (local.set $t (i32.add (local.get $p) (local.get $n)))
    (loop $write
      (local.set $t (i32.sub (local.get $t) (i32.const 1)))
      (i32.store8 (local.get $t) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $write (local.get $v)))
    (i32.add (local.get $p) (local.get $n)))
  ;; log "name(a,b,c)" with the first $nargs arguments
  (func $emit (param $name i32) (param $len i32) (param $nargs i32)
    (param $a i32) (param $b i32) (param $c i32) (param $d i32) (param $e i32)
    (local $p i32)
    (memory.copy (i32.const {SCRATCH}) (local.get $name) (local.get $len))
    (local.set $p (i32.add (i32.const {SCRATCH}) (local.get $len)))
    (i32.store8 (local.get $p) (i32.const 40))
    (local.set $p (i32.add (local.get $p) (i32.const 1)))
    (if (i32.ge_u (local.get $nargs) (i32.const 1)) (then
      (local.set $p (call $utoa (local.get $a) (local.get $p)))))
    (if (i32.ge_u (local.get $nargs) (i32.const 2)) (then
      (i32.store8 (local.get $p) (i32.const 44))
      (local.set $p (call $utoa (local.get $b) (i32.add (local.get $p) (i32.const 1))))))
    (if (i32.ge_u (local.get $nargs) (i32.const 3)) (then
      (i32.store8 (local.get $p) (i32.const 44))
      (local.set $p (call $utoa (local.get $c) (i32.add (local.get $p) (i32.const 1))))))
    (if (i32.ge_u (local.get $nargs) (i32.const 4)) (then
      (i32.store8 (local.get $p) (i32.const 44))
      (local.set $p (call $utoa (local.get $d) (i32.add (local.get $p) (i32.const 1))))))
    (if (i32.ge_u (local.get $nargs) (i32.const 5)) (then
      (i32.store8 (local.get $p) (i32.const 44))
      (local.set $p (call $utoa (local.get $e) (i32.add (local.get $p) (i32.const 1))))))
    (i32.store8 (local.get $p) (i32.const 41))
    (local.set $p (i32.add (local.get $p) (i32.const 1)))
    (drop (call $log (i32.const 2) (i32.const {SCRATCH}) (i32.sub (local.get $p) (i32.const {SCRATCH})))))
  ;; log "<prefix><status>:<bytes>"
  (func $probe (param $pre i32) (param $prelen i32) (param $status i32) (param $ptr i32) (param $size i32)
    (local $p i32)
    (memory.copy (i32.const {SCRATCH}) (local.get $pre) (local.get $prelen))
    (local.set $p (call $utoa (local.get $status) (i32.add (i32.const {SCRATCH}) (local.get $prelen))))
    (i32.store8 (local.get $p) (i32.const 58))
    (local.set $p (i32.add (local.get $p) (i32.const 1)))
    (if (i32.eqz (local.get $status)) (then
      (memory.copy (local.get $p) (local.get $ptr) (local.get $size))
      (local.set $p (i32.add (local.get $p) (local.get $size)))))
    (drop (call $log (i32.const 2) (i32.const {SCRATCH}) (i32.sub (local.get $p) (i32.const {SCRATCH})))))
{"".join(funcs)}
)"""


def build(tmp_path: Path, name: str = "tracer", **options: object) -> Path:
    path = tmp_path / f"{name}.wasm"
    path.write_bytes(bytes(wasmtime.wat2wasm(tracer(**options))))  # type: ignore[arg-type]
    return path


@pytest.fixture
def rig() -> Iterator[FilterRig]:
    with FilterRig() as r:
        yield r


def trace(rig: FilterRig, plugin: str = "filter", allocations: bool = False) -> list[str]:
    """The module's info lines, in order (allocator calls left out unless asked for)."""
    lines = [m for p, level, m in rig.logs if p == plugin and level is LogLevel.INFO]
    if not allocations:
        lines = [ln for ln in lines
                 if not ln.startswith(("malloc(", "proxy_on_memory_allocate("))]
    return lines


def take(rig: FilterRig, plugin: str = "filter") -> list[str]:
    """`trace` since the previous `take`."""
    lines = trace(rig, plugin)
    seen = getattr(rig, "_taken", {}).get(plugin, 0)
    rig.__dict__.setdefault("_taken", {})[plugin] = len(lines)
    return lines[seen:]




START = [
    "proxy_on_context_create(1,0)",
    "plugin_root_id=0:",
    "init(0)",
    "proxy_on_vm_start(1,0)",
    "vm_config=0:",
    "plugin_config_at_vm_start=1:",
    "proxy_on_configure(1,0)",
]


# -- start-up ------------------------------------------------------------------------------------


def test_startup_sequence(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(build(tmp_path))
    assert plugin.report().module.abi_version == "0.2.0"
    assert take(rig) == START


def test_configuration_through_buffers_6_and_7(rig: FilterRig, tmp_path: Path) -> None:
    rig.load(build(tmp_path), b'{"plugin": true}', vm_configuration=b"vm-config\x00bytes",
             root_id="my-root")
    assert take(rig) == [
        "proxy_on_context_create(1,0)",
        "plugin_root_id=0:my-root",  # readable during the root's proxy_on_context_create
        "init(0)",
        "proxy_on_vm_start(1,15)",
        "vm_config=0:vm-config\x00bytes",
        "plugin_config_at_vm_start=1:",  # NOT_FOUND outside proxy_on_configure
        "proxy_on_configure(1,16)",
        'plugin_config=0:{"plugin": true}',
    ]


# -- streams ---------------------------------------------------------------------------------------


def test_request_with_bodies_and_trailers(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(build(tmp_path))
    take(rig)
    rec = Recorder()
    request = HeaderMap([(":method", "POST"), (":path", "/"), (":authority", "h"), (":scheme", "http"),
                         ("content-type", "text/plain")])
    stream = plugin.new_stream(abi.StreamInfo(request_headers=request), rec)
    assert take(rig) == []  # the context is created lazily, with the first callback
    assert stream.request_headers(request, False) is FilterStatus.CONTINUE
    assert stream.request_body(bytearray(b"abcd"), False) is FilterStatus.CONTINUE
    assert stream.request_body(bytearray(b"efg"), False) is FilterStatus.CONTINUE
    assert stream.request_trailers(HeaderMap([("x-t", "1")])) is FilterStatus.CONTINUE
    response = HeaderMap([(":status", "200"), ("content-length", "9")])
    assert stream.response_headers(response, False) is FilterStatus.CONTINUE
    assert stream.response_body(bytearray(b"12345"), False) is FilterStatus.CONTINUE
    assert stream.response_body(bytearray(b"6789"), False) is FilterStatus.CONTINUE
    assert stream.response_trailers(HeaderMap([("a", "1"), ("b", "2")])) is FilterStatus.CONTINUE
    stream.complete()
    stream.complete()  # exactly once
    assert take(rig) == [
        "proxy_on_context_create(2,1)",
        "proxy_on_request_headers(2,5,0)",
        "proxy_on_request_body(2,4,0)",
        "proxy_on_request_body(2,3,0)",
        "proxy_on_request_trailers(2,1)",
        "proxy_on_response_headers(2,2,0)",
        "proxy_on_response_body(2,5,0)",
        "proxy_on_response_body(2,4,0)",
        "proxy_on_response_trailers(2,2)",
        "proxy_on_log(2)",
        "proxy_on_done(2)",
        "proxy_on_delete(2)",
    ]
    assert rec.events == []
    # The next stream gets a new context id.
    ex = rig.request(plugin, "POST", "/", body=b"xy", response_body=b"z")
    assert ex.status == 200
    assert take(rig) == [
        "proxy_on_context_create(3,1)",
        "proxy_on_request_headers(3,4,0)",
        "proxy_on_request_body(3,2,1)",
        "proxy_on_response_headers(3,1,0)",
        "proxy_on_response_body(3,1,1)",
        "proxy_on_log(3)",
        "proxy_on_done(3)",
        "proxy_on_delete(3)",
    ]


def test_headers_only_request(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(build(tmp_path))
    take(rig)
    rig.request(plugin)
    assert take(rig) == [
        "proxy_on_context_create(2,1)",
        "proxy_on_request_headers(2,4,1)",
        "proxy_on_response_headers(2,1,1)",
        "proxy_on_log(2)",
        "proxy_on_done(2)",
        "proxy_on_delete(2)",
    ]


def test_local_reply_during_request_headers(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(build(tmp_path))
    take(rig)
    ex = rig.request(plugin, "POST", "/", headers=[("x-reply", "yes")], body=b"never seen")
    assert ex.local_reply is not None
    assert ex.local_reply.status == 403
    assert ex.local_reply.body == b"nope"
    assert ex.local_reply.headers == (("x-r", "1"),)
    assert ex.local_reply.details == "by_tracer"
    assert ex.local_reply.grpc_status is None
    assert [(p.name, p.status) for p in ex.phases] == [
        ("request_headers", "stop"),  # the filter returned Continue; the reply overrides it
        ("response_headers", "continue"),
        ("response_body", "continue"),
    ]
    assert take(rig) == [
        "proxy_on_context_create(2,1)",
        "proxy_on_request_headers(2,5,0)",
        # no request body: the request ended with the reply; the reply goes through the
        # filter's own response callbacks (:status, content-length, content-type, x-r)
        "proxy_on_response_headers(2,4,0)",
        "proxy_on_response_body(2,4,1)",
        "proxy_on_log(2)",
        "proxy_on_done(2)",
        "proxy_on_delete(2)",
    ]


def test_stream_completed_before_any_callback(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(build(tmp_path))
    take(rig)
    stream = plugin.new_stream(abi.StreamInfo(), Recorder())
    stream.complete()
    assert take(rig) == []  # no headers ever seen: no context, nothing to log
    assert plugin.report().active_streams == 0


def _callee(rig: FilterRig, gate: asyncio.Event | None = None) -> tuple[web.AppRunner, str, list]:
    """An upstream for the tracer's callout (POST /cb -> 201 "pong!"); `gate` holds answers."""
    seen: list[tuple[str, str, str, bytes]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, request.headers.get("Host", ""), await request.read()))
        if gate is not None:
            await asyncio.wait_for(gate.wait(), 5.0)
        return web.Response(status=201, body=b"pong!", headers={"x-a": "1"})

    app = web.Application()
    app.router.add_post("/cb", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)

    async def start() -> str:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server  # noqa: SLF001 - the bound port is only known here
        assert server is not None and server.sockets
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    return runner, rig.loop.run_until_complete(start()), seen


def test_http_call_response_goes_to_root(rig: FilterRig, tmp_path: Path) -> None:
    runner, address, seen = _callee(rig)
    try:
        plugin = rig.load(build(tmp_path))
        take(rig)
        ex = rig.request(plugin, headers=[("x-call", address)], wait=10.0)
        lines = take(rig)
    finally:
        rig.loop.run_until_complete(runner.cleanup())
    assert seen == [("POST", "/cb", "up", b"ping")]
    assert ex.phases[0].status == "stop→resumed"
    assert lines[:3] == [
        "proxy_on_context_create(2,1)",
        "proxy_on_request_headers(2,5,1)",
        "http_call(0,4)",  # OK, first token 4 (HTTP-call ids have the low 2 bits 0)
    ]
    response = lines[3]
    assert response.startswith("proxy_on_http_call_response(1,4,")  # the root, the token
    nheaders, body_size, ntrailers = (int(x) for x in response[:-1].split(",")[2:])
    assert nheaders >= 3 and body_size == 5 and ntrailers == 0  # :status, x-a, content-length...
    assert lines[4:] == [
        "body=0:pong!",
        "effective(0)",
        "continue_stream(0)",
        "proxy_on_response_headers(2,1,1)",
        "proxy_on_log(2)",
        "proxy_on_done(2)",
        "proxy_on_delete(2)",
    ]


def test_root_done_waits_for_proxy_done(rig: FilterRig, tmp_path: Path) -> None:
    """Root proxy_on_done returning 0 defers proxy_on_delete until the module calls proxy_done."""
    gate = asyncio.Event()
    runner, address, seen = _callee(rig, gate)
    try:
        plugin = rig.load(build(tmp_path))
        take(rig)
        rec = Recorder()
        request = HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "h"), ("x-call", address)])
        stream = plugin.new_stream(abi.StreamInfo(request_headers=request), rec)
        assert stream.request_headers(request, True) is FilterStatus.STOP

        async def until_seen() -> None:
            while not seen:
                await asyncio.sleep(0.01)

        rig.loop.run_until_complete(asyncio.wait_for(until_seen(), 5.0))
        plugin.retire()
        stream.complete()  # the last stream: the root is asked to finish, with its call pending
        assert take(rig) == [
            "proxy_on_context_create(2,1)",
            "proxy_on_request_headers(2,4,1)",
            "http_call(0,4)",
            "proxy_on_log(2)",
            "proxy_on_done(2)",
            "proxy_on_delete(2)",
            "proxy_on_done(1)",  # returns 0: not deleted yet
        ]
        gate.set()

        async def until_deleted() -> None:
            while "proxy_on_delete(1)" not in trace(rig):
                await asyncio.sleep(0.01)

        rig.loop.run_until_complete(asyncio.wait_for(until_deleted(), 5.0))
        lines = take(rig)
    finally:
        gate.set()
        rig.loop.run_until_complete(runner.cleanup())
    assert lines[0].startswith("proxy_on_http_call_response(1,4,")
    assert lines[1:] == [
        "body=0:pong!",
        "effective(2)",  # BAD_ARGUMENT: the stream context is gone
        "continue_stream(1)",  # NOT_FOUND: no stream acting
        "proxy_done(0)",
        "proxy_on_delete(1)",  # after the callback that called proxy_done returned
    ]
    assert rec.events == []


# -- retire ----------------------------------------------------------------------------------------


def test_retire_calls_root_done_and_delete(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(build(tmp_path))
    rig.request(plugin)
    take(rig)
    plugin.retire()
    assert take(rig) == ["proxy_on_done(1)", "proxy_on_delete(1)"]
    assert plugin.report().vm_count == 0
    assert plugin.report().state is PluginState.RETIRED


def test_retire_waits_for_the_last_stream(rig: FilterRig, tmp_path: Path) -> None:
    plugin = rig.load(build(tmp_path))
    take(rig)
    request = HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "h")])
    stream = plugin.new_stream(abi.StreamInfo(request_headers=request), Recorder())
    stream.request_headers(request, True)
    plugin.retire()
    assert take(rig) == ["proxy_on_context_create(2,1)", "proxy_on_request_headers(2,3,1)"]
    stream.response_headers(HeaderMap([(":status", "204")]), True)
    stream.complete()
    assert take(rig) == [
        "proxy_on_response_headers(2,1,1)",
        "proxy_on_log(2)",
        "proxy_on_done(2)",
        "proxy_on_delete(2)",
        "proxy_on_done(1)",
        "proxy_on_delete(1)",
    ]
    assert plugin.report().vm_count == 0


# -- ABI 0.1.0 ---------------------------------------------------------------------------------------


def test_abi_0_1_0_module(rig: FilterRig, tmp_path: Path) -> None:
    path = build(tmp_path, "legacy", abi_version="0_1_0")
    plugin = rig.load(path, b"plugin-cfg", vm_configuration=b"vm-cfg")
    assert plugin.report().module.abi_version == "0.1.0"
    assert take(rig) == [
        "proxy_on_context_create(1,0)",
        "plugin_root_id=0:",
        "init(0)",
        "proxy_on_vm_start(1,6)",
        "get_configuration=0:vm-cfg",
        "proxy_on_configure(1,10)",
        "get_configuration=0:plugin-cfg",
    ]
    ex = rig.request(plugin, "GET", "/old", wait=10.0)
    assert [(p.name, p.status) for p in ex.phases] == [
        ("request_headers", "stop→resumed"), ("response_headers", "continue")]
    assert ex.events == ["continue_request"]
    assert take(rig) == [
        "proxy_on_context_create(2,1)",
        "proxy_on_request_headers(2,4)",  # 2 parameters in 0.1.0
        "x-missing=0:",  # a missing header is OK + empty in 0.1.0
        "out(0,0)",  # ... returned as ptr 0 / size 0
        "proxy_on_tick(1)",
        "effective(0)",
        "continue_request(0)",  # proxy_continue_request on the stream made effective
        "proxy_on_response_headers(2,1)",
        "proxy_on_log(2)",
        "proxy_on_done(2)",
        "proxy_on_delete(2)",
    ]


def test_abi_0_2_0_missing_header_is_not_found(rig: FilterRig, tmp_path: Path) -> None:
    # The same probe through the 0.2.x module: x-reply is absent -> no local reply, Continue.
    plugin = rig.load(build(tmp_path))
    ex = rig.request(plugin)
    assert ex.local_reply is None and ex.status == 200


# -- start functions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("init", "lines", "mask"),
    [
        ((), [], 0),
        (("start",), [], 1),
        (("_initialize",), ["_initialize()"], 2),
        (("_initialize", "main"), ["_initialize()", "main(0,0)"], 6),
        (("main",), [], 0),  # main alone is not a start function
        (("_start",), ["_start()"], 8),
        (("_initialize", "_start"), ["_initialize()"], 2),  # _initialize wins
        (("start", "_initialize", "main"), ["_initialize()", "main(0,0)"], 7),
    ],
)
def test_start_functions(rig: FilterRig, tmp_path: Path, init: tuple[str, ...], lines: list[str],
                         mask: int) -> None:
    plugin = rig.load(build(tmp_path, init=init))
    got = take(rig)
    assert got[: len(lines)] == lines
    rest = got[len(lines):]
    assert rest[:3] == ["proxy_on_context_create(1,0)", "plugin_root_id=0:", f"init({mask})"]
    assert rig.request(plugin).status == 200


# -- allocators ------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocator", ["malloc", "proxy_on_memory_allocate"])
def test_allocator(rig: FilterRig, tmp_path: Path, allocator: str) -> None:
    rig.load(build(tmp_path, allocator=(allocator,)), b"cfg!", vm_configuration=b"vm")
    lines = trace(rig, allocations=True)
    assert lines == [
        "proxy_on_context_create(1,0)",
        "plugin_root_id=0:",  # empty: ptr 0 / size 0, the allocator is not called
        "init(0)",
        "proxy_on_vm_start(1,2)",
        f"{allocator}(2)",
        "vm_config=0:vm",
        "plugin_config_at_vm_start=1:",
        "proxy_on_configure(1,4)",
        f"{allocator}(4)",
        "plugin_config=0:cfg!",
    ]


def test_both_allocators_prefer_malloc(rig: FilterRig, tmp_path: Path) -> None:
    rig.load(build(tmp_path, allocator=("proxy_on_memory_allocate", "malloc")), b"cfg")
    lines = trace(rig, allocations=True)
    assert "malloc(3)" in lines
    assert not any(ln.startswith("proxy_on_memory_allocate(") for ln in lines)


# -- load errors -----------------------------------------------------------------------------------


def test_not_wasm(rig: FilterRig, tmp_path: Path) -> None:
    path = tmp_path / "filter.wasm"
    path.write_text("this is not wasm\n")
    with pytest.raises(abi.PluginLoadError) as info:
        rig.load(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert "not a WebAssembly module" in info.value.reason


def test_missing_file(rig: FilterRig, tmp_path: Path) -> None:
    path = tmp_path / "absent.wasm"
    with pytest.raises(abi.PluginLoadError) as info:
        rig.load(path)
    assert str(path) in str(info.value)
    assert "cannot read" in info.value.reason


def test_invalid_wasm_body(rig: FilterRig, tmp_path: Path) -> None:
    path = tmp_path / "broken.wasm"
    path.write_bytes(b"\0asm\x01\0\0\0\x05garbage")
    with pytest.raises(abi.PluginLoadError) as info:
        rig.load(path)
    assert str(path) in str(info.value)
    assert "invalid WebAssembly" in info.value.reason


def test_no_abi_marker(rig: FilterRig, tmp_path: Path) -> None:
    path = build(tmp_path, "nomarker", marker=False)
    with pytest.raises(abi.PluginLoadError) as info:
        rig.load(path)
    assert str(path) in str(info.value)
    assert "no proxy_abi_version" in info.value.reason


def test_unknown_import(rig: FilterRig, tmp_path: Path) -> None:
    # An env.proxy_* call sluice does not define links to an UNIMPLEMENTED stub (issue 14);
    # strict_imports refuses it, and any other unknown import is refused (tests/test_abi_imports.py).
    path = build(tmp_path, "unknown_import",
                 extra_imports='(import "env" "proxy_frobnicate" (func (param i32) (result i32)))')
    assert rig.load(path).report().module.unknown_imports == ("proxy_frobnicate",)
    with pytest.raises(abi.PluginLoadError) as info:
        rig.load(path, name="strict", strict_imports=True)
    assert str(path) in str(info.value)
    assert "proxy_frobnicate" in info.value.reason
    other = build(tmp_path, "foreign_import", extra_imports='(import "env" "frobnicate" (func (param i32)))')
    with pytest.raises(abi.PluginLoadError) as info:
        rig.load(other)
    assert info.value.reason == "imports that sluice does not provide: env.frobnicate"


def test_wrong_import_signature(rig: FilterRig, tmp_path: Path) -> None:
    path = build(tmp_path, "bad_sig", extra_imports='(import "env" "proxy_done" (func (param i32)))')
    with pytest.raises(abi.PluginLoadError) as info:
        rig.load(path)
    assert str(path) in str(info.value)
    assert "proxy_done" in info.value.reason


def test_no_allocator(rig: FilterRig, tmp_path: Path) -> None:
    path = build(tmp_path, "noalloc", allocator=())
    with pytest.raises(abi.PluginLoadError) as info:
        rig.load(path)
    assert str(path) in str(info.value)
    assert "allocator" in info.value.reason


def test_configure_rejected(rig: FilterRig, tmp_path: Path) -> None:
    wat = tracer().replace(
        '(func (export "proxy_on_configure") (param i32 i32) (result i32)',
        '(func (export "proxy_on_configure") (param i32 i32) (result i32) (return (i32.const 0))',
    )
    path = tmp_path / "reject.wasm"
    path.write_bytes(bytes(wasmtime.wat2wasm(wat)))
    with pytest.raises(abi.PluginLoadError) as info:
        rig.load(path)
    assert str(path) in str(info.value)
    assert "proxy_on_configure returned false" in info.value.reason


# -- compile cache -------------------------------------------------------------------------------


def test_compile_cache(tmp_path: Path) -> None:
    path = build(tmp_path)
    cache = tmp_path / "cache"
    first = abi.Runtime(cache_dir=cache)
    try:
        module = first.compile(path)
        assert module.from_cache is False
        assert module.abi_version == "0.2.0"
        assert list(cache.glob("*.cwasm"))
    finally:
        first.close()
    with FilterRig(cache_dir=cache) as rig:
        module = rig.runtime.compile(path)
        assert module.from_cache is True
        assert module.abi_version == "0.2.0"
        plugin = rig.runtime.load(abi.PluginSpec(name="filter", module_path=path), rig.host, module=module)
        rig.plugins.append(plugin)
        assert take(rig) == START
        assert rig.request(plugin).status == 200
        # Another module is compiled, not taken from the cache.
        other = rig.runtime.compile(build(tmp_path, "other", init=("_start",)))
        assert other.from_cache is False


def test_corrupt_cache_entry_is_recompiled(tmp_path: Path) -> None:
    path = build(tmp_path)
    cache = tmp_path / "cache"
    first = abi.Runtime(cache_dir=cache)
    try:
        first.compile(path)
    finally:
        first.close()
    (entry,) = cache.glob("*.cwasm")
    entry.write_bytes(b"garbage")
    second = abi.Runtime(cache_dir=cache)
    try:
        module = second.compile(path)
        assert module.from_cache is False
        assert second.compile(path).from_cache is True  # rewritten
    finally:
        second.close()


def test_report_is_a_frozen_reading_of_the_plugin(rig: FilterRig, tmp_path: Path) -> None:
    import dataclasses

    from sluice.abi import PluginReport, PluginState

    plugin = rig.load(build(tmp_path))
    rec = Recorder()
    request = HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "h"), (":scheme", "http")])
    stream = plugin.new_stream(abi.StreamInfo(request_headers=request), rec)
    stream.request_headers(request, True)
    stream.complete()
    report = plugin.report()
    assert isinstance(report, PluginReport)
    assert report.state is PluginState.OK
    assert report.counters.streams == 1
    assert report.callback_seconds.count == report.counters.callbacks > 0
    assert report.module.sha256 == plugin.report().module.sha256
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.name = "other"  # type: ignore[misc]
