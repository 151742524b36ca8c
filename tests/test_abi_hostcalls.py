"""env.proxy_* host functions at their edges (reference 1.0-1.12, 4.1, 4.2).

fixtures/wat/hostcalls.wat calls host functions the way no SDK does (bad pointers, out-of-range
enums, malformed buffers) and logs "name=status" for each call, so a test sees the exact status
every call answered, and that none of them trapped.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from hosting import Exchange, FilterRig, metric_values

from sluice import abi
from sluice.abi import HeaderMap, PluginState
from sluice.abi.fastcall import serialize_pairs
from sluice.abi.types import WasmResult

WAT = Path(__file__).resolve().parent / "fixtures" / "wat" / "hostcalls.wat"

OK = WasmResult.OK
NOT_FOUND = WasmResult.NOT_FOUND
BAD_ARGUMENT = WasmResult.BAD_ARGUMENT
INVALID_MEMORY_ACCESS = WasmResult.INVALID_MEMORY_ACCESS
CAS_MISMATCH = WasmResult.CAS_MISMATCH
UNIMPLEMENTED = WasmResult.UNIMPLEMENTED

# Every call /badptr makes, in order: the function, and which pointer argument is out of bounds.
BAD_POINTER_CALLS = [
    "proxy_log", "proxy_get_log_level", "proxy_get_current_time_nanoseconds",
    "proxy_get_configuration", "proxy_get_status.code", "proxy_get_status.message",
    "proxy_get_buffer_bytes", "proxy_set_buffer_bytes", "proxy_get_buffer_status",
    "proxy_get_header_map_pairs", "proxy_set_header_map_pairs",
    "proxy_get_header_map_value.key", "proxy_get_header_map_value.out",
    "proxy_add_header_map_value.key", "proxy_add_header_map_value.value",
    "proxy_replace_header_map_value.key", "proxy_replace_header_map_value.value",
    "proxy_remove_header_map_value", "proxy_get_header_map_size",
    "proxy_get_property.path", "proxy_get_property.out",
    "proxy_set_property.path", "proxy_set_property.value",
    "proxy_send_local_response.details", "proxy_send_local_response.body",
    "proxy_send_local_response.headers",
    "proxy_http_call.upstream", "proxy_http_call.headers", "proxy_http_call.body", "proxy_http_call.token",
    "proxy_get_shared_data.key", "proxy_get_shared_data.out",
    "proxy_set_shared_data.key", "proxy_set_shared_data.value",
    "proxy_register_shared_queue.name", "proxy_register_shared_queue.token",
    "proxy_resolve_shared_queue.name", "proxy_resolve_shared_queue.token",
    "proxy_enqueue_shared_queue", "proxy_dequeue_shared_queue",
    "proxy_define_metric.name", "proxy_define_metric.id", "proxy_get_metric",
    "proxy_call_foreign_function.name", "proxy_call_foreign_function.args",
    "proxy_call_foreign_function.out",
    "proxy_http_call.trailers", "proxy_resolve_shared_queue.vm_id",
    "proxy_log.huge_length", "proxy_log.straddling_the_end",
    "proxy_log.below_log_level",  # a trace line the host drops is still checked
]


@pytest.fixture(scope="module")
def wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wat") / "hostcalls.wasm"
    out.write_bytes(wasmtime.wat2wasm(WAT.read_text()))
    return out



@pytest.fixture
def rig() -> Iterator[FilterRig]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with FilterRig(clusters={"dead": f"127.0.0.1:{port}"}) as r:
        calls: list[str] = []
        original = r.host.http_call

        def counting_http_call(upstream, *args):  # type: ignore[no-untyped-def]
            calls.append(upstream)
            return original(upstream, *args)

        r.host.http_call = counting_http_call  # type: ignore[method-assign]
        r.http_calls = calls  # type: ignore[attr-defined]
        yield r


@pytest.fixture
def plugin(rig: FilterRig, wasm: Path) -> abi.Plugin:
    return rig.load(wasm, vm_configuration=b"vm-config")


def reports(rig: FilterRig) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, _, message in rig.logs:
        name, sep, value = message.partition("=")
        if sep and value.isdigit() and name.replace("_", "").replace(".", "").isalnum():
            out[name] = int(value)
    return out


def raw_logs(rig: FilterRig) -> list[bytes]:
    """Log lines as the bytes the module passed (proxy_log decodes with surrogateescape)."""
    return [m.encode("utf-8", "surrogateescape") for _, _, m in rig.logs]


def served(ex: Exchange, plugin: abi.Plugin, status: int | None = 200) -> None:
    assert plugin.report().counters.traps == 0, plugin.report().last_error
    assert ex.local_reply is None
    if status is not None:
        assert ex.status == status


# -- 1.0: bad pointers -------------------------------------------------------------------------


def test_every_pointer_argument_is_bounds_checked(rig: FilterRig, plugin: abi.Plugin) -> None:
    ex = rig.request(plugin, path="/badptr")
    served(ex, plugin)
    seen = reports(rig)
    missing = [name for name in BAD_POINTER_CALLS if name not in seen]
    assert not missing, f"the module never got past {missing[0]}"
    wrong = {name: seen[name] for name in BAD_POINTER_CALLS if seen[name] != INVALID_MEMORY_ACCESS}
    assert wrong == {}
    # Nothing happened on the way: no header added, no reply, no callout started.
    assert ex.request_headers.get("x-bad") is None
    assert rig.http_calls == []  # type: ignore[attr-defined]


def test_bad_pointers_leave_the_vm_usable(rig: FilterRig, plugin: abi.Plugin) -> None:
    rig.request(plugin, path="/badptr")
    ex = rig.request(plugin, path="/maps")
    served(ex, plugin, status=None)  # /maps empties the response headers
    assert reports(rig)["get_pairs"] == OK


# -- statuses other than OK ------------------------------------------------------------------------


def test_out_of_range_arguments_and_missing_things(rig: FilterRig, plugin: abi.Plugin) -> None:
    served(rig.request(plugin, path="/badarg"), plugin)
    seen = reports(rig)
    expected = {
        "log_level_6": BAD_ARGUMENT,
        "get_pairs_map_8": BAD_ARGUMENT,
        "set_pairs_map_8": BAD_ARGUMENT,
        "get_value_map_8": BAD_ARGUMENT,
        "add_map_8": BAD_ARGUMENT,
        "replace_map_8": BAD_ARGUMENT,
        "remove_map_8": BAD_ARGUMENT,
        "size_map_8": BAD_ARGUMENT,
        "get_buffer_9": NOT_FOUND,  # Higress's Redis reply buffer: only inside proxy_on_redis_call_response
        "set_buffer_9": BAD_ARGUMENT,
        "buffer_status_9": BAD_ARGUMENT,
        "define_metric_3": BAD_ARGUMENT,
        "missing_header": NOT_FOUND,
        "unknown_property": NOT_FOUND,
        "unknown_foreign": NOT_FOUND,
        "continue_stream_3": UNIMPLEMENTED,
        "continue_stream_4": BAD_ARGUMENT,
        "close_stream_4": BAD_ARGUMENT,
        "done": NOT_FOUND,
        "grpc_call": UNIMPLEMENTED,
        "grpc_stream": UNIMPLEMENTED,
        "grpc_send": UNIMPLEMENTED,
        "grpc_cancel": UNIMPLEMENTED,
        "grpc_close": UNIMPLEMENTED,
        "increment_unknown_metric": NOT_FOUND,
        "get_unknown_metric": NOT_FOUND,
        "http_call_no_method": BAD_ARGUMENT,  # :method, :path and :authority are required
        "http_call_unknown_upstream": BAD_ARGUMENT,
        "http_call_negative_timeout": BAD_ARGUMENT,
    }
    assert {name: seen.get(name) for name in expected} == expected


def test_stream_functions_called_from_a_root_context(rig: FilterRig, plugin: abi.Plugin) -> None:
    seen = reports(rig)  # logged by proxy_on_configure
    assert seen["root_get_header"] == BAD_ARGUMENT
    assert seen["root_add_header"] == BAD_ARGUMENT
    assert seen["root_get_pairs"] == OK  # an unavailable map reads as empty (Envoy)
    assert seen["root_send_local_response"] == NOT_FOUND
    assert seen["root_continue_stream"] == NOT_FOUND
    assert seen["root_set_property"] == NOT_FOUND
    assert seen["root_get_request_body"] == OK  # empty outside the body callbacks
    assert seen["root_set_request_body"] == NOT_FOUND
    assert seen["root_effective_self"] == OK
    assert plugin.report().state is PluginState.OK


# -- 1.3 / 4.1 header maps ---------------------------------------------------------------------------


def test_header_map_size_pairs_round_trip_and_replacement(rig: FilterRig, plugin: abi.Plugin) -> None:
    request = HeaderMap([(":method", "GET"), (":path", "/maps"), (":authority", "example.com"),
                         (":scheme", "http"), ("x-one", "1"), ("x-two", "dos")])
    ex = rig.request(plugin, path="/maps", headers=[("x-one", "1"), ("x-two", "dos")])
    served(ex, plugin, status=None)  # /maps empties the response headers
    seen = reports(rig)
    assert seen["size"] == OK
    assert seen["size_value"] == request.byte_size()  # bytes of names and values, not a count
    assert seen["get_pairs"] == OK
    assert serialize_pairs(request.items()) in raw_logs(rig)
    assert seen["set_same_pairs"] == OK
    # The second set replaced the whole map.
    assert seen["set_new_pairs"] == OK
    assert ex.request_headers.items() == [(":path", "/maps"), ("x-set", "yes")]


def test_malformed_pairs_clear_the_map(rig: FilterRig, plugin: abi.Plugin) -> None:
    ex = rig.request(plugin, path="/maps", response_headers=[("x-upstream", "1")])
    served(ex, plugin, status=None)
    seen = reports(rig)
    assert seen["set_malformed"] == OK  # cpp-host: a buffer that does not parse means "no pairs"
    assert seen["response_size"] == OK and seen["response_size_value"] == 0
    assert ex.response_headers is not None and len(ex.response_headers) == 0


# -- 1.2 buffers --------------------------------------------------------------------------------------


def test_buffer_splices_and_ranges(rig: FilterRig, plugin: abi.Plugin) -> None:
    ex = rig.request(plugin, method="POST", path="/body", body=b"hello", response_body=b"upstream body")
    served(ex, plugin)
    seen = reports(rig)
    assert seen["prepend"] == OK and seen["append"] == OK
    assert ex.request_body == b"[hello]"
    logs = raw_logs(rig)
    assert seen["get_all"] == OK  # max_size 0xFFFFFFFF is clamped to what there is
    assert seen["get_part"] == OK
    assert seen["get_from_2"] == OK  # start + max_size overflows u32: still clamped
    i = logs.index(b"get_all=0")
    assert logs[i + 1] == b"[hello]"
    assert logs[i + 3] == b"hel"
    assert seen["get_past_end"] == OK and seen["past_end_size"] == 0
    assert logs[logs.index(b"get_from_2=0") + 1] == b"ello]"
    assert seen["status"] == OK and seen["length"] == len(b"[hello]")
    # Replace (0, len) on the response body.
    assert seen["replace"] == OK
    assert ex.response_body == b"replaced"


# -- 1.10 metrics --------------------------------------------------------------------------------------


def test_metric_semantics(rig: FilterRig, plugin: abi.Plugin) -> None:
    served(rig.request(plugin, path="/metrics"), plugin)
    seen = reports(rig)
    assert seen["counter_define"] == OK and seen["counter_id"] & 3 == 0 and seen["counter_id"] > 0
    assert seen["counter_inc_0"] == BAD_ARGUMENT
    assert seen["counter_inc_neg"] == BAD_ARGUMENT
    assert seen["counter_inc_5"] == OK
    assert seen["counter_record_10"] == OK  # Envoy: record on a counter adds
    assert seen["counter_get"] == OK and seen["counter_value"] == 15
    assert seen["gauge_define"] == OK and seen["gauge_id"] & 3 == 1
    assert seen["gauge_record_7"] == OK and seen["gauge_inc_neg"] == OK
    assert seen["gauge_value"] == 5
    assert seen["gauge_record_4"] == OK and seen["gauge_value_after_record"] == 4
    assert seen["histogram_define"] == OK and seen["histogram_id"] & 3 == 2
    assert seen["histogram_record"] == OK
    assert seen["histogram_get"] == BAD_ARGUMENT
    assert seen["histogram_inc"] == BAD_ARGUMENT
    # Defining a name again gives a new id for the same metric.
    assert seen["counter_redefine"] == OK
    assert seen["counter_id2"] != seen["counter_id"] and seen["counter_id2"] & 3 == 0
    assert seen["counter2_inc"] == OK
    assert metric_values(plugin) == {"c": 16, "g": 4, "h": 1}


# -- 1.11 sluice's foreign functions ---------------------------------------------------------------------


def test_shared_data_keys_and_delete(rig: FilterRig, plugin: abi.Plugin) -> None:
    served(rig.request(plugin, path="/foreign"), plugin)
    seen = reports(rig)
    assert seen["keys"] == OK
    logs = raw_logs(rig)
    listed = logs[logs.index(b"keys=0") + 1]
    assert sorted(k for k, _ in HeaderMap.deserialize(listed)) == ["k1", "k2"]
    assert seen["keys_no_out"] == OK
    assert seen["delete_bad_cas"] == CAS_MISMATCH
    assert seen["delete_short"] == BAD_ARGUMENT  # fewer than 4 bytes: no CAS
    assert seen["delete"] == OK
    assert seen["get_deleted"] == NOT_FOUND
    assert seen["delete_missing"] == NOT_FOUND
    assert seen["delete_right_cas"] == OK
    assert rig.shared_data.keys("filter", b"") == [b"other"]


def test_pairs_layout_sanity() -> None:
    """The hand-built buffers in hostcalls.wat are what the wire format says they are."""
    pairs = serialize_pairs([(":path", "/maps"), ("x-set", "yes")])
    assert len(pairs) == 42
    assert struct.unpack_from("<I", pairs)[0] == 2
    callout = serialize_pairs([(":method", "GET"), (":path", "/"), (":authority", "dead")])
    assert len(callout) == 64


# -- 0.1.0-style modules ---------------------------------------------------------------------------------


def test_legacy_module_signatures_and_semantics(rig: FilterRig, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.wasm"
    legacy.write_bytes(wasmtime.wat2wasm((WAT.parent / "legacy.wat").read_text()))
    plugin = rig.load(legacy, b"plugin-config", vm_configuration=b"vm-config")
    ex = rig.request(plugin, method="POST", body=b"not for the filter",
                     response_headers=[("x-a", "1"), ("x-b", "2")])
    served(ex, plugin)
    seen = reports(rig)
    messages = [m for _, _, m in rig.logs]
    # proxy_get_configuration: the plugin configuration inside proxy_on_configure, else the VM's.
    assert seen["configure_status"] == OK
    assert messages[messages.index("configure_status=0") + 1] == "plugin-config"
    assert seen["vm_config_status"] == OK
    assert messages[messages.index("vm_config_status=0") + 1] == "vm-config"
    # 0.1.0: a missing header is OK with an empty value.
    assert seen["missing"] == OK and seen["missing_size"] == 0
    # Two-parameter header callbacks are called (with the header count)...
    assert ex.request_headers.get("x-legacy") == "0.1.0"
    assert seen["response_headers"] == 3
    # ...and an export with a signature no ABI version has is never called.
    assert ex.request_body == b"not for the filter"


def test_each_header_callback_is_called_with_its_own_arity(rig: FilterRig, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed_headers.wasm"
    mixed.write_bytes(wasmtime.wat2wasm((WAT.parent / "mixed_headers.wat").read_text()))
    plugin = rig.load(mixed)
    ex = rig.request(plugin)  # nothing may escape a stream method
    served(ex, plugin)
    messages = [m for _, _, m in rig.logs]
    assert messages == ["request headers", "response headers"]


# -- Higress's Redis calls (ABI 0.2.100) -----------------------------------------------------------

REDIS_WAT = Path(__file__).resolve().parent / "fixtures" / "wat" / "redis.wat"


def _statuses(rig: FilterRig) -> dict[str, str]:
    return dict(m.split("=", 1) for _, _, m in rig.logs if "=" in m)


def test_redis_calls_without_a_redis_host_are_unimplemented(tmp_path: Path) -> None:
    wasm = tmp_path / "redis.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(REDIS_WAT.read_text()))

    class PlainHost:
        """An `abi.Host` with no Redis methods (as a host that only proxies HTTP)."""

        def __init__(self, inner: abi.Host) -> None:
            self.inner = inner

        def http_call(self, *args: object) -> bool:
            return False

        def call_later(self, delay_s: float, callback: object) -> abi.Cancellable:
            return self.inner.call_later(delay_s, callback)  # type: ignore[arg-type]

        def log(self, plugin: str, level: abi.LogLevel, message: str) -> None:
            self.inner.log(plugin, level, message)

    with FilterRig() as rig:
        plugin = rig.runtime.load(abi.PluginSpec(name="redis", module_path=wasm), PlainHost(rig.host))
        try:
            assert plugin.report().module.abi_version == "0.2.100"
            got = _statuses(rig)
            assert got["init"] == got["init_unknown"] == str(int(UNIMPLEMENTED))
        finally:
            plugin.retire()


def test_redis_call_pauses_until_the_reply_is_in_buffer_9(tmp_path: Path) -> None:
    from redis_server import REDIS_SERVER, RedisServer

    from sluice.proxy.config import ClusterConfig, HostPort

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    wasm = tmp_path / "redis.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(REDIS_WAT.read_text()))
    server = RedisServer(tmp_path / "redis").start()
    try:
        with FilterRig() as rig:
            rig.host.redis.learn({"limits": ClusterConfig(type="redis", endpoints=[HostPort.parse(server.address)])})
            plugin = rig.load(wasm, name="redis")
            assert _statuses(rig) == {"init": str(int(OK)), "init_unknown": str(int(BAD_ARGUMENT))}
            rig.logs.clear()
            ex = rig.request(plugin, wait=5.0)
            got = _statuses(rig)
            assert got["call"] == str(int(OK)) and int(got["token"]) > 0 and int(got["token"]) % 4 == 0
            assert got["call_unknown"] == str(int(BAD_ARGUMENT))  # never readied
            assert got["buffer_outside"] == str(int(NOT_FOUND))
            # The reply re-encoded as RESP2 (redis-py hands "+PONG" over as a bulk string).
            assert got["response"] == "0" and got["size"] == "10" and got["buffer"] == str(int(OK))
            assert any(m == "$4\r\nPONG\r\n" for _, _, m in rig.logs)
            assert got["continue"] == str(int(OK))
            assert "continue_request" in ex.events and ex.response_headers is not None

            server.stop()  # no answer now: status 1 (REDIS_CALL_FAILED), no buffer
            rig.logs.clear()
            ex = rig.request(plugin, wait=5.0)
            got = _statuses(rig)
            assert got["response"] == str(abi.REDIS_CALL_FAILED) and got["size"] == "0"
            assert got["buffer"] == str(int(NOT_FOUND))
            assert "continue_request" in ex.events
    finally:
        server.stop()
