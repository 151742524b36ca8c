"""Properties `node` / `xds.node` and `listener_direction`, encoded as Envoy encodes them
(sluice/abi/properties.py, sluice/abi/protobuf.py). The protobuf bytes are checked with a wire
format reader written here, independent of the encoder."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from sluice.abi import NodeInfo, PluginSpec
from sluice.abi.headers import deserialize_pairs
from sluice.abi.properties import encode, lookup

META: dict[str, Any] = {
    "WORKLOAD_NAME": "reviews-v1", "LABELS": {"app": "reviews", "version": "v1"},
    "ratio": 0.5, "replicas": 3, "mesh": True, "none": None, "ips": ["10.0.0.1", "10.0.0.2"],
}
SPEC = PluginSpec("f", Path("f.wasm"), node=NodeInfo("node-1", "cluster-a", META), listener_direction=1)


def prop(*path: str, spec: PluginSpec = SPEC) -> bytes | None:
    value = lookup(list(path), spec, None)  # no stream: what a root context sees in configure
    return None if value is None else encode(value)


def varint(data: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = data[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return out, pos


def fields(data: bytes) -> list[tuple[int, Any]]:
    """(field number, value) of a message: varints as int, fixed64 as double, the rest as bytes."""
    out: list[tuple[int, Any]] = []
    pos = 0
    while pos < len(data):
        key, pos = varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            v, pos = varint(data, pos)
        elif wire == 1:
            v, pos = struct.unpack_from("<d", data, pos)[0], pos + 8
        elif wire == 2:
            n, pos = varint(data, pos)
            v, pos = data[pos : pos + n], pos + n
        else:
            raise AssertionError(f"wire type {wire}")
        out.append((number, v))
    return out


def decode_value(data: bytes) -> Any:
    ((number, v),) = fields(data)
    return {1: lambda: None, 2: lambda: v, 3: lambda: v.decode(), 4: lambda: bool(v),
            5: lambda: decode_struct(v), 6: lambda: [decode_value(x) for _, x in fields(v)]}[number]()


def decode_struct(data: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for number, entry in fields(data):
        assert number == 1
        parts = dict(fields(entry))
        out[parts[1].decode()] = decode_value(parts[2])
    return out


def test_node_is_a_serialized_envoy_node() -> None:
    node = prop("node")
    assert node is not None and node == prop("xds.node")
    parts = fields(node)
    assert [n for n, _ in parts] == [1, 2, 3]
    assert parts[0][1] == b"node-1" and parts[1][1] == b"cluster-a"
    assert decode_struct(parts[2][1]) == META
    assert prop("node", "id") == b"node-1" and prop("node", "cluster") == b"cluster-a"


def test_node_metadata_and_its_values() -> None:
    metadata = prop("node", "metadata")
    assert metadata is not None and decode_struct(metadata) == META
    assert prop("node", "metadata", "WORKLOAD_NAME") == b"reviews-v1"
    assert prop("node", "metadata", "ratio") == struct.pack("<d", 0.5)
    assert prop("node", "metadata", "replicas") == struct.pack("<d", 3.0)  # Struct numbers are doubles
    assert prop("node", "metadata", "mesh") == b"\x01"
    assert prop("node", "metadata", "none") == b""
    labels = prop("node", "metadata", "LABELS")
    assert labels is not None and deserialize_pairs(labels) == [("app", "reviews"), ("version", "v1")]
    assert prop("node", "metadata", "LABELS", "app") == b"reviews"
    ips = prop("node", "metadata", "ips")
    assert ips is not None and deserialize_pairs(ips) == [("10.0.0.1", ""), ("10.0.0.2", "")]
    assert prop("node", "metadata", "ips", "1") == b"10.0.0.2"
    for missing in (("node", "metadata", "NOPE"), ("node", "locality"), ("node", "id", "x"),
                    ("node", "metadata", "ips", "7"), ("node", "metadata", "WORKLOAD_NAME", "x")):
        assert prop(*missing) is None, missing


def test_an_empty_node_is_valid_and_empty() -> None:
    spec = PluginSpec("f", Path("f.wasm"))
    assert prop("node", spec=spec) == b""
    assert prop("node", "metadata", spec=spec) == b""  # an empty Struct: OK, no bytes
    assert prop("node", "id", spec=spec) == b""
    assert prop("listener_direction", spec=spec) == struct.pack("<q", 0)


def test_listener_direction() -> None:
    assert prop("listener_direction") == struct.pack("<q", 1)
    assert prop("xds.listener_direction") == struct.pack("<q", 1)
