"""The few protobuf messages sluice serializes for properties: `envoy.config.core.v3.Node` (id,
cluster, metadata) and `google.protobuf.Struct` / `Value` / `ListValue`.

Hand-written (proto3 wire format, no protobuf dependency): fields are written in field-number
order, empty scalars are omitted as proto3 does, and map entries (Struct fields) are sorted by key,
as protobuf's deterministic serialization sorts them, so equal metadata gives equal bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

# Wire types.
_VARINT = 0
_FIXED64 = 1
_LEN = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(payload)) + payload


def _string(field: int, text: str) -> bytes:
    return _len_field(field, text.encode("utf-8")) if text else b""


def value(v: Any) -> bytes:
    """A `google.protobuf.Value` (oneof: null 1, number 2, string 3, bool 4, struct 5, list 6)."""
    if v is None:
        return _key(1, _VARINT) + b"\x00"
    if isinstance(v, bool):
        return _key(4, _VARINT) + (b"\x01" if v else b"\x00")
    if isinstance(v, int | float):
        return _key(2, _FIXED64) + struct.pack("<d", float(v))
    if isinstance(v, str):
        return _len_field(3, v.encode("utf-8"))
    if isinstance(v, Mapping):
        return _len_field(5, struct_message(v))
    if isinstance(v, Sequence) and not isinstance(v, bytes | bytearray):
        return _len_field(6, list_value(v))
    raise TypeError(f"not a JSON-like value: {type(v).__name__}")


def struct_message(fields: Mapping[str, Any]) -> bytes:
    """A `google.protobuf.Struct`: `map<string, Value> fields = 1` (an empty Struct is no bytes)."""
    out = bytearray()
    for name in sorted(fields):
        entry = _string(1, name) + _len_field(2, value(fields[name]))
        out += _len_field(1, entry)
    return bytes(out)


def list_value(values: Sequence[Any]) -> bytes:
    """A `google.protobuf.ListValue`: `repeated Value values = 1`."""
    return b"".join(_len_field(1, value(v)) for v in values)


def node(node_id: str, cluster: str, metadata: Mapping[str, Any]) -> bytes:
    """An `envoy.config.core.v3.Node`: id = 1, cluster = 2, metadata = 3 (Struct)."""
    meta = struct_message(metadata)
    return _string(1, node_id) + _string(2, cluster) + (_len_field(3, meta) if meta else b"")
