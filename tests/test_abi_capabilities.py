"""Capabilities and limits per filter (issue 13, item 7; `abi.Capabilities`, `abi.FilterLimits`),
through fixtures/wat/hostcall_forward.wat: a denied call answers its ABI status, is counted in
`PluginCounters.refused`, and never traps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime
from forwarding import DATA, call, compile_forwarder
from hosting import FilterRig, closed_port

from sluice import abi
from sluice.abi.fastcall import serialize_pairs
from sluice.abi.types import WasmResult

OK = WasmResult.OK
NOT_FOUND = WasmResult.NOT_FOUND
BAD_ARGUMENT = WasmResult.BAD_ARGUMENT
UNIMPLEMENTED = WasmResult.UNIMPLEMENTED
OUT = 0x40  # out parameters (returned buffer pointer, size, token) in the forwarder's scratch area


@pytest.fixture
def rig() -> Iterator[FilterRig]:
    dead = f"127.0.0.1:{closed_port()}"
    with FilterRig(clusters={"auth": dead, "billing": dead}) as r:
        yield r


@pytest.fixture
def wasm(tmp_path: Path) -> Path:
    return compile_forwarder(tmp_path)


def load(rig: FilterRig, wasm: Path, name: str = "filter", **spec: object) -> abi.Plugin:
    return rig.load(wasm, name=name, **spec)


def refused(plugin: abi.Plugin) -> dict[str, int]:
    return dict(plugin.report().counters.refused)


def http_call(rig: FilterRig, plugin: abi.Plugin, cluster: str) -> int:
    headers = serialize_pairs([(":method", "GET"), (":path", "/"), (":authority", cluster)])
    name = cluster.encode()
    blob = name + headers
    status = call(rig, plugin, "proxy_http_call", DATA, len(name), DATA + len(name), len(headers),
                  0, 0, 0, 0, 1000, OUT, data=blob)
    # Let the callout fail (its cluster is a closed port) rather than leave its task pending
    # when the rig closes: a pending task destroyed by the collector later runs its code inside
    # whatever allocates then (CPython 3.11 then trips over its AST recursion check).
    rig.run_for(0.05)
    return status


def test_defaults_grant_what_filters_had(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm)
    assert plugin.report().counters.refused == {}
    assert http_call(rig, plugin, "auth") == OK
    assert http_call(rig, plugin, "billing") == OK
    path = b"source\0address"
    assert call(rig, plugin, "proxy_get_property", DATA, len(path), OUT, OUT + 4, data=path) == OK
    assert refused(plugin) == {}


def test_http_call_only_to_granted_clusters(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, capabilities=abi.Capabilities(http_call=("auth",)))
    assert http_call(rig, plugin, "auth") == OK
    # What an unknown cluster answers: the filter cannot tell forbidden from absent.
    assert http_call(rig, plugin, "billing") == BAD_ARGUMENT
    assert http_call(rig, plugin, "nowhere") == BAD_ARGUMENT
    assert refused(plugin) == {"capability.http_call": 2}
    assert plugin.report().counters.traps == 0


def test_local_reply_denied_answers_unimplemented(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, capabilities=abi.Capabilities(local_reply=False))
    status = call(rig, plugin, "proxy_send_local_response", 403, 0, 0, 0, 0, 0, 0, 0xFFFFFFFF)
    assert status == UNIMPLEMENTED
    ex = rig.request(plugin, headers=_forward("proxy_send_local_response", 403, 0, 0, 0, 0, 0, 0, 0xFFFFFFFF))
    assert ex.local_reply is None and ex.status == 200
    assert refused(plugin) == {"capability.local_reply": 2}
    granted = load(rig, wasm, name="granted")
    ex = rig.request(granted, headers=_forward("proxy_send_local_response", 403, 0, 0, 0, 0, 0, 0, 0xFFFFFFFF))
    assert ex.local_reply is not None and ex.local_reply.status == 403


def _forward(function: str, *args: int) -> list[tuple[str, str]]:
    from forwarding import forward_headers

    return forward_headers(function, args)


@pytest.mark.parametrize(
    ("granted", "path", "readable"),
    [
        (("request",), b"request\0path", True),
        (("request",), b"source\0address", False),
        (("request.path",), b"request\0path", True),
        (("request.path",), b"request\0method", False),
        (("request.path",), b"request", False),
        (("plugin_name", "source"), b"source\0address", True),
        ((), b"plugin_name", False),
        (("request",), b"requests\0path", False),
        (("xds",), b"xds.route_name", True),
    ],
)
def test_properties_outside_the_granted_prefixes_are_not_found(
    rig: FilterRig, wasm: Path, granted: tuple[str, ...], path: bytes, readable: bool
) -> None:
    plugin = load(rig, wasm, capabilities=abi.Capabilities(properties=granted))
    status = call(rig, plugin, "proxy_get_property", DATA, len(path), OUT, OUT + 4, data=path)
    assert status == (OK if readable else NOT_FOUND)
    assert refused(plugin) == ({} if readable else {"capability.properties": 1})


def test_shared_data_read_only(rig: FilterRig, wasm: Path) -> None:
    rig.shared_data.set("filter", b"key", b"value", 0)
    plugin = load(rig, wasm, capabilities=abi.Capabilities(shared_data_write=False))
    blob = b"key" + b"new"
    assert call(rig, plugin, "proxy_set_shared_data", DATA, 3, DATA + 3, 3, 0, data=blob) == UNIMPLEMENTED
    assert call(rig, plugin, "proxy_get_shared_data", DATA, 3, OUT, OUT + 4, OUT + 8, data=blob) == OK
    name = b"sluice_shared_data_delete"
    args = b"\0\0\0\0key"
    assert call(rig, plugin, "proxy_call_foreign_function", DATA, len(name), DATA + len(name), len(args),
                0, 0, data=name + args) == UNIMPLEMENTED
    entry = rig.shared_data.get("filter", b"key")
    assert entry is not None and entry[0] == b"value"
    assert refused(plugin) == {"capability.shared_data_write": 2}


def test_queues_of_other_vm_ids_only_when_granted(rig: FilterRig, wasm: Path) -> None:
    owner = load(rig, wasm, name="owner", vm_id="other")
    assert call(rig, owner, "proxy_register_shared_queue", DATA, 1, OUT, data=b"q", name="owner") == OK
    blob = b"other" + b"q"
    args = (DATA, 5, DATA + 5, 1, OUT)
    closed = load(rig, wasm, name="closed", capabilities=abi.Capabilities(queue_vm_ids=()))
    assert call(rig, closed, "proxy_resolve_shared_queue", *args, data=blob, name="closed") == NOT_FOUND
    assert refused(closed) == {"capability.queue_vm_ids": 1}
    opened = load(rig, wasm, name="opened", capabilities=abi.Capabilities(queue_vm_ids=("other",)))
    assert call(rig, opened, "proxy_resolve_shared_queue", *args, data=blob, name="opened") == OK
    # Its own vm_id is always visible, named or empty.
    own = load(rig, wasm, name="own", vm_id="other", capabilities=abi.Capabilities(queue_vm_ids=()))
    assert call(rig, own, "proxy_resolve_shared_queue", *args, data=blob, name="own") == OK
    assert call(rig, own, "proxy_resolve_shared_queue", DATA, 0, DATA + 5, 1, OUT, data=blob, name="own") == OK
    assert refused(own) == {}


def test_metric_redefinitions_keep_the_latest_ids_and_the_first(rig: FilterRig, wasm: Path) -> None:
    # Ids are (n << 2) | type, n counting definitions: a counter's first definition is 4.
    plugin = load(rig, wasm, limits=abi.FilterLimits(max_metrics=2))
    for _ in range(40):
        assert call(rig, plugin, "proxy_define_metric", 0, DATA, 1, OUT, data=b"m") == OK
    assert refused(plugin) == {}
    assert len(plugin.report().metrics) == 1
    # 39 re-definitions, 32 kept: n = 2..8 are forgotten, n = 9..40 and the first stay.
    assert call(rig, plugin, "proxy_increment_metric", 1 << 2, 1) == OK
    assert call(rig, plugin, "proxy_increment_metric", 8 << 2, 1) == NOT_FOUND
    assert call(rig, plugin, "proxy_increment_metric", 9 << 2, 1) == OK
    assert call(rig, plugin, "proxy_increment_metric", 40 << 2, 1) == OK
    assert plugin.report().metrics[0].value == 3


def test_new_metrics_beyond_the_limit_are_refused(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, limits=abi.FilterLimits(max_metrics=2))
    assert call(rig, plugin, "proxy_define_metric", 0, DATA, 1, OUT, data=b"a") == OK
    assert call(rig, plugin, "proxy_define_metric", 1, DATA, 1, OUT, data=b"b") == OK
    assert call(rig, plugin, "proxy_define_metric", 0, DATA, 1, OUT, data=b"c") == BAD_ARGUMENT
    assert call(rig, plugin, "proxy_define_metric", 0, DATA, 1, OUT, data=b"a") == OK  # already there
    assert refused(plugin) == {"limit.max_metrics": 1}


def test_header_pairs_over_the_limit_keep_the_map(rig: FilterRig, wasm: Path) -> None:
    plugin = load(rig, wasm, limits=abi.FilterLimits(max_headers=8))
    pairs = serialize_pairs([(f"x-{i}", "v") for i in range(9)])
    status = call(rig, plugin, "proxy_set_header_map_pairs", 0, DATA, len(pairs), data=pairs)
    assert status == BAD_ARGUMENT
    assert refused(plugin) == {"limit.max_headers": 1}
    small = serialize_pairs([(":path", "/"), ("x-a", "1")])
    ex = rig.request(plugin, headers=[*_forward("proxy_set_header_map_pairs", 0, DATA, len(small)),
                                      ("x-data", small.decode("utf-8", "surrogateescape"))])
    assert ex.request_headers.items() == [(":path", "/"), ("x-a", "1")]


def test_environment_narrowed_to_the_granted_names(rig: FilterRig, tmp_path: Path) -> None:
    # caps.wat logs the WASI environment block it reads (see test_abi_sandbox.py).
    wat = Path(__file__).resolve().parent / "fixtures" / "wat" / "caps.wat"
    module = tmp_path / "caps.wasm"
    module.write_bytes(wasmtime.wat2wasm(wat.read_text()))
    plugin = rig.load(module, environment={"A": "1", "SECRET": "s", "B": "2"},
                      capabilities=abi.Capabilities(environment=("A", "B")))
    rig.request(plugin)
    assert ("filter", abi.LogLevel.INFO, "A=1\0B=2\0") in rig.logs
    assert not any("SECRET" in m for _, _, m in rig.logs)
