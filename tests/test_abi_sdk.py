"""Real filters built with the public AssemblyScript SDK (@solo-io/proxy-runtime 0.1.8), run
through the single-filter rig. What each fixture does: tests/fixtures/as/README.md."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hosting import FilterRig, Recorder, metric_values

from sluice import abi
from sluice.abi import FilterStatus, HeaderMap, LogLevel, PluginState
from sluice.abi.hostcalls import ENV_FUNCTIONS

ROOT = Path(__file__).resolve().parent.parent
AS = ROOT / "tests" / "fixtures" / "as" / "build"
EXAMPLE = ROOT / "examples" / "assemblyscript" / "build" / "add_header.wasm"
FIXTURES = ["headers", "local_reply", "shared_cas", "callout", "tick_metrics", "properties", "body",
            "default_configure"]


@pytest.fixture
def rig() -> Iterator[FilterRig]:
    with FilterRig() as r:
        yield r


def count_host_calls(plugin: abi.Plugin) -> collections.Counter[str]:
    """Wrap the live VM's host-function implementations to count the calls the module makes."""
    counts: collections.Counter[str] = collections.Counter()
    vm = plugin._vm
    assert vm is not None
    for index, (name, _, _) in enumerate(ENV_FUNCTIONS):
        impl = vm.host_impls[index]

        def wrapped(*args: int, _impl: Any = impl, _name: str = name) -> Any:
            counts[_name] += 1
            return _impl(*args)

        vm.host_impls[index] = wrapped
    return counts




# -- every fixture ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_abi_version_detected(rig: FilterRig, name: str) -> None:
    module = rig.runtime.compile(AS / f"{name}.wasm")
    assert module.abi_version == "0.2.0"
    assert module.path == AS / f"{name}.wasm"


def test_plugin_reports_module_abi_version(rig: FilterRig) -> None:
    plugin = rig.load(AS / "headers.wasm")
    assert plugin.report().module.abi_version == "0.2.0"
    assert plugin.report().state is PluginState.OK


# -- headers -------------------------------------------------------------------------------------


def test_headers_reads_four_writes_one(rig: FilterRig) -> None:
    plugin = rig.load(AS / "headers.wasm")
    counts = count_host_calls(plugin)
    ex = rig.request(plugin, "PUT", "/a/b?c=1", headers=[("user-agent", "t/1")])
    assert [(p.name, p.status) for p in ex.phases] == [
        ("request_headers", "continue"), ("response_headers", "continue")]
    assert ex.request_headers.get("x-as-seen") == "PUT /a/b?c=1"
    assert ex.request_headers.get_all("x-as-seen") == ["PUT /a/b?c=1"]
    assert ex.response_headers is not None
    assert ex.response_headers.get("x-as-filter") == "headers"
    assert ex.status == 200
    assert counts["proxy_get_header_map_value"] == 4
    assert counts["proxy_add_header_map_value"] == 2  # one request write, one response write
    assert counts["proxy_replace_header_map_value"] == 0
    assert counts["proxy_send_local_response"] == 0


def test_headers_missing_user_agent_reads_empty(rig: FilterRig) -> None:
    plugin = rig.load(AS / "headers.wasm")
    ex = rig.request(plugin, "GET", "/x")
    assert ex.request_headers.get("x-as-seen") == "GET /x"
    assert ex.response_headers is not None and ex.response_headers.get("x-as-filter") == "headers"
    assert rig.plugins[0].report().counters.traps == 0


def test_headers_many_requests_no_leak_of_contexts(rig: FilterRig) -> None:
    plugin = rig.load(AS / "headers.wasm")
    for i in range(50):
        ex = rig.request(plugin, path=f"/{i}")
        assert ex.request_headers.get("x-as-seen") == f"GET /{i}"
    assert plugin.report().active_streams == 0
    vm = plugin._vm
    assert vm is not None
    assert len(vm.contexts) == 1  # only the root is left
    assert plugin.report().counters.traps == 0


# -- local_reply -----------------------------------------------------------------------------------


def test_local_reply_denies_and_reply_passes_response_callbacks(rig: FilterRig) -> None:
    plugin = rig.load(AS / "local_reply.wasm")
    ex = rig.request(plugin, "GET", "/deny/this", response_status=200, response_body=b"upstream")
    assert ex.local_reply is not None
    assert ex.local_reply.status == 403
    assert ex.local_reply.body == b"denied by as"
    assert ex.local_reply.headers == (("x-denied", "1"),)
    assert ex.local_reply.grpc_status is None
    assert ex.local_reply.details == ""
    assert ex.status == 403
    assert ex.response_headers is not None
    assert ex.response_headers.get("x-denied") == "1"
    assert ex.response_body == b"denied by as"
    assert ex.events == ["local_reply"]
    # Envoy re-enters the filter's own response callbacks with its local reply.
    assert [(p.name, p.status) for p in ex.phases] == [
        ("request_headers", "stop"), ("response_headers", "continue"), ("response_body", "continue")]
    # (The exact callback sequence of this case is checked with a tracing module in
    # test_abi_lifecycle.py::test_local_reply_during_request_headers.)
    assert plugin.report().counters.traps == 0
    assert plugin.report().counters.traps == 0


def test_local_reply_other_paths_continue(rig: FilterRig) -> None:
    plugin = rig.load(AS / "local_reply.wasm")
    counts = count_host_calls(plugin)
    ex = rig.request(plugin, "GET", "/allowed", response_body=b"ok")
    assert ex.local_reply is None
    assert ex.status == 200
    assert ex.response_body == b"ok"
    assert counts["proxy_send_local_response"] == 0
    ex = rig.request(plugin, "GET", "/deny")
    assert ex.status == 403
    assert counts["proxy_send_local_response"] == 1


def test_local_reply_stream_by_hand(rig: FilterRig) -> None:
    plugin = rig.load(AS / "local_reply.wasm")
    rec = Recorder()
    request = HeaderMap([(":method", "GET"), (":path", "/deny"), (":authority", "h")])
    stream = plugin.new_stream(abi.StreamInfo(request_headers=request), rec)
    assert stream.request_headers(request, True) is FilterStatus.STOP
    assert rec.events == ["local_reply"]
    assert rec.replies[0].status == 403
    stream.complete()
    assert plugin.report().active_streams == 0


# -- properties ------------------------------------------------------------------------------------


def test_properties_every_reported_value(rig: FilterRig) -> None:
    plugin = rig.load(AS / "properties.wasm", name="props", vm_id="vm-props")
    ex = rig.request(plugin, "POST", "/p/q?x=1", source="10.1.2.3:4567", body=b"abc")
    h = ex.response_headers
    assert h is not None
    got = [(k, v) for k, v in h if k.startswith("x-prop-")]
    assert got == [
        ("x-prop-plugin_name", "props"),
        ("x-prop-plugin_root_id", ""),
        ("x-prop-plugin_vm_id", "vm-props"),
        ("x-prop-request-path", "/p/q?x=1"),
        ("x-prop-request-method", "POST"),
        ("x-prop-source-address", "10.1.2.3:4567"),
        ("x-prop-source-port", "4567"),  # 8-byte little-endian int64 decoded by the filter
        ("x-prop-as_note", "hello"),  # proxy_set_property round trip
    ]
    assert plugin.report().counters.traps == 0


def test_properties_source_port_is_int64(rig: FilterRig) -> None:
    plugin = rig.load(AS / "properties.wasm")
    ex = rig.request(plugin, source="[::1]:65535")
    assert ex.response_headers is not None
    assert ex.response_headers.get("x-prop-source-port") == "65535"
    assert ex.response_headers.get("x-prop-source-address") == "[::1]:65535"


def test_properties_set_property_lands_in_filter_state(rig: FilterRig) -> None:
    plugin = rig.load(AS / "properties.wasm")
    rec = Recorder()
    request = HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "h")])
    info = abi.StreamInfo(source_address="1.2.3.4:80", request_headers=request)
    stream = plugin.new_stream(info, rec)
    assert stream.request_headers(request, True) is FilterStatus.CONTINUE
    assert info.filter_state == {"as_note": b"hello"}
    stream.complete()


def test_root_id_without_factory_fails_load(rig: FilterRig) -> None:
    # The AS SDK reads plugin_root_id in the root proxy_on_context_create and aborts when no
    # factory is registered under that id (all fixtures register "").
    with pytest.raises(abi.PluginLoadError) as info:
        rig.load(AS / "properties.wasm", root_id="no-such-root")
    assert "properties.wasm" in str(info.value)
    assert "proxy_on_context_create" in info.value.reason


# -- body --------------------------------------------------------------------------------------------


def test_body_rewritten_both_directions(rig: FilterRig) -> None:
    plugin = rig.load(AS / "body.wasm")
    ex = rig.request(plugin, "POST", "/", body=b"hello, World 1!", response_body=b"upstream body")
    assert ex.request_body == b"HELLO, WORLD 1!"
    assert ex.response_body == b"[as]upstream body"
    assert [p.status for p in ex.phases] == ["continue"] * 4


def test_body_response_without_body_untouched(rig: FilterRig) -> None:
    plugin = rig.load(AS / "body.wasm")
    ex = rig.request(plugin, "GET", "/")
    assert ex.response_body == b""
    assert [p.name for p in ex.phases] == ["request_headers", "response_headers"]


def test_body_pauses_until_end_of_stream(rig: FilterRig) -> None:
    plugin = rig.load(AS / "body.wasm")
    rec = Recorder()
    request = HeaderMap([(":method", "POST"), (":path", "/"), (":authority", "h")])
    stream = plugin.new_stream(abi.StreamInfo(request_headers=request), rec)
    assert stream.request_headers(request, False) is FilterStatus.CONTINUE
    buf = bytearray(b"abc")
    assert stream.request_body(buf, False) is FilterStatus.STOP
    assert buf == b"abc"  # untouched while buffering
    buf += b"def"
    assert stream.request_body(buf, False) is FilterStatus.STOP
    buf += b"-xyz"
    assert stream.request_body(buf, True) is FilterStatus.CONTINUE
    assert buf == b"ABCDEF-XYZ"

    response = HeaderMap([(":status", "200")])
    assert stream.response_headers(response, False) is FilterStatus.CONTINUE
    rbuf = bytearray(b"one ")
    assert stream.response_body(rbuf, False) is FilterStatus.STOP
    assert rbuf == b"one "
    rbuf += b"two"
    assert stream.response_body(rbuf, True) is FilterStatus.CONTINUE
    assert rbuf == b"[as]one two"
    stream.complete()
    assert rec.events == []
    assert plugin.report().counters.traps == 0


def test_body_empty_final_chunk_gets_prefix(rig: FilterRig) -> None:
    plugin = rig.load(AS / "body.wasm")
    rec = Recorder()
    request = HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "h")])
    stream = plugin.new_stream(abi.StreamInfo(request_headers=request), rec)
    stream.request_headers(request, True)
    stream.response_headers(HeaderMap([(":status", "200")]), False)
    rbuf = bytearray()
    assert stream.response_body(rbuf, True) is FilterStatus.CONTINUE
    assert rbuf == b"[as]"
    stream.complete()


# -- default_configure -----------------------------------------------------------------------------


def test_default_configure_traps_on_empty_configuration(rig: FilterRig) -> None:
    path = AS / "default_configure.wasm"
    with pytest.raises(abi.PluginLoadError) as info:
        rig.load(path, name="dflt")
    err = info.value
    assert err.path == str(path)
    assert str(path) in str(err)
    assert "trapped in proxy_on_configure" in err.reason
    assert "proc_exit(255)" in err.reason
    critical = [m for _, level, m in rig.logs if level is LogLevel.CRITICAL]
    assert any("runtime.ts" in m for m in critical), rig.logs
    # The failed load leaves nothing behind: the same module loads with a configuration.
    plugin = rig.load(path, b"x", name="dflt")
    assert rig.request(plugin).status == 200


def test_default_configure_loads_with_configuration(rig: FilterRig) -> None:
    plugin = rig.load(AS / "default_configure.wasm", {"k": "v"})
    ex = rig.request(plugin, "GET", "/")
    assert ex.status == 200
    assert [p.status for p in ex.phases] == ["continue", "continue"]
    assert plugin.report().counters.traps == 0
    assert not [m for _, level, m in rig.logs if level >= LogLevel.ERROR]


# -- tick_metrics ------------------------------------------------------------------------------------


def test_tick_metrics(rig: FilterRig) -> None:
    plugin = rig.load(AS / "tick_metrics.wasm")
    assert metric_values(plugin).get("as_ticks", 0) == 0
    rig.run_for(0.3)
    ticks = metric_values(plugin)["as_ticks"]
    assert ticks >= 2  # 20 ms period over 300 ms; generous lower bound
    ex = rig.request(plugin)
    assert ex.response_headers is not None
    seen = int(ex.response_headers.get("x-ticks") or "-1")
    assert seen >= ticks
    rig.request(plugin)
    values = metric_values(plugin)
    assert values["as_requests"] == 2
    assert values["as_gauge"] == 7
    assert values["as_hist"] == 2  # samples
    metric = {m.name: m for m in plugin.report().metrics}["as_hist"]
    assert metric.type is abi.MetricType.HISTOGRAM
    assert metric.histogram is not None
    hist = metric.histogram
    assert hist.sum == 84
    assert sum(hist.counts) == 2
    rig.run_for(0.1)
    assert metric_values(plugin)["as_ticks"] > ticks


def test_tick_stops_on_retire(rig: FilterRig) -> None:
    plugin = rig.load(AS / "tick_metrics.wasm")
    rig.run_for(0.1)
    plugin.retire()
    after = metric_values(plugin)["as_ticks"]
    rig.run_for(0.15)
    assert metric_values(plugin)["as_ticks"] == after
    assert plugin.report().state is PluginState.RETIRED


# -- the example filter --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "header"),
    [
        (None, ("x-hello", "world")),
        ({}, ("x-hello", "world")),
        ({"header": "x-greeting", "value": "hello"}, ("x-greeting", "hello")),
        ({"value": "v"}, ("x-hello", "v")),
        ({"header": "x-a"}, ("x-a", "world")),
        ('{"other": [1, {"a": null}], "header": "x-u", "value": "caf\\u00e9"}', ("x-u", "café")),
    ],
)
def test_example_add_header(rig: FilterRig, config: Any, header: tuple[str, str]) -> None:
    plugin = rig.load(EXAMPLE, config)
    assert plugin.report().module.abi_version == "0.2.0"
    ex = rig.request(plugin, response_headers=[(header[0], "upstream")])
    assert ex.response_headers is not None
    assert ex.response_headers.get_all(header[0]) == ["upstream", header[1]]
    assert header in ex.response_headers.items()
    assert ("x-hello", "world") not in ex.request_headers.items()
    info = [m for _, level, m in rig.logs if level is LogLevel.INFO]
    assert f"add_header: will add response header {header[0]}: {header[1]}" in info


def test_example_header_names_are_lower_cased(rig: FilterRig) -> None:
    plugin = rig.load(EXAMPLE, {"header": "X-Mixed-Case", "value": "V"})
    ex = rig.request(plugin)
    assert ex.response_headers is not None
    assert ex.response_headers.get("x-mixed-case") == "V"
    assert ("x-mixed-case", "V") in ex.response_headers.items()


@pytest.mark.parametrize("config", ['{"header": ""}', '{"header": 5}', "not json", "[]",
                                    '{"header":"x",}', '{"value": null}', '{} x'])
def test_example_add_header_rejects_bad_configuration(rig: FilterRig, config: str) -> None:
    with pytest.raises(abi.PluginLoadError) as info:
        rig.load(EXAMPLE, config.encode())
    assert "add_header.wasm" in str(info.value)
    assert "proxy_on_configure returned false" in info.value.reason
    errors = [m for _, level, m in rig.logs if level is LogLevel.ERROR]
    assert any(m.startswith("add_header: invalid configuration:") for m in errors), rig.logs


# -- shared data across two loads -----------------------------------------------------------------


def test_same_fixture_two_vm_ids_separate_shared_data(rig: FilterRig) -> None:
    a = rig.load(AS / "shared_cas.wasm", name="a", vm_id="vm-a")
    b = rig.load(AS / "shared_cas.wasm", name="b", vm_id="vm-b")
    seen_a = [rig.request(a).request_headers.get("x-hits") for _ in range(3)]
    seen_b = [rig.request(b).request_headers.get("x-hits") for _ in range(2)]
    assert seen_a == ["1", "2", "3"]
    assert seen_b == ["1", "2"]
    assert rig.shared_data.get("vm-a", b"hits")[0] == b"3"  # type: ignore[index]
    assert rig.shared_data.get("vm-b", b"hits")[0] == b"2"  # type: ignore[index]
    assert rig.shared_data.get("", b"hits") is None
