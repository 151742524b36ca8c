"""Well-known properties (reference 4.3-4.5), encoded the way Envoy encodes them.

Paths are NUL-separated segments. Values: strings raw, ints 8-byte little-endian, bools one byte,
timestamps/durations int64 nanoseconds, maps in the pairs format. Unknown top-level names fall
back to the stream's filter state set by `proxy_set_property` (Envoy's `wasm.<name>`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import protobuf
from .api import NodeInfo, PluginSpec, StreamInfo
from .fastcall import serialize_pairs
from .headers import HeaderMap

Value = str | bytes | int | bool | dict[str, str] | None


def split_path(raw: bytes) -> list[str]:
    parts = raw.split(b"\0")
    if len(parts) > 1 and parts[-1] == b"":
        parts.pop()  # the C++ SDK ends every segment with NUL
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def encode(value: Value) -> bytes:
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        return struct.pack("<q", value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        return serialize_pairs(value.items())
    return b""


def _split_hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return address, 0


def _headers_map(headers: HeaderMap | None) -> dict[str, str] | None:
    if headers is None:
        return None
    out: dict[str, str] = {}
    for k, v in headers:
        if k.startswith(":"):
            continue
        out[k] = f"{out[k]},{v}" if k in out else v
    return out


def _request(info: StreamInfo, field: str) -> Value:
    h = info.request_headers
    path = (h.get(":path") if h else None) or ""
    match field:
        case "path":
            return path
        case "url_path":
            return path.split("?", 1)[0]
        case "query":
            return path.split("?", 1)[1] if "?" in path else ""
        case "host":
            return h.get(":authority") if h else None
        case "scheme":
            return (h.get(":scheme") if h else None) or info.scheme
        case "method":
            return h.get(":method") if h else None
        case "headers":
            return _headers_map(h)
        case "referer":
            return h.get("referer") if h else None
        case "useragent":
            return h.get("user-agent") if h else None
        case "id":
            return h.get("x-request-id") if h else None
        case "protocol":
            return info.protocol
        case "time":
            return info.start_time_ns
        case "duration":
            return info.duration_ns or None
        case "size":
            return info.request_size
        case "total_size":
            return info.request_size + (h.byte_size() if h else 0)
        case "headers_bytes":
            return h.byte_size() if h else 0
    return None


def _response(info: StreamInfo, field: str) -> Value:
    h = info.response_headers
    match field:
        case "code":
            return info.response_code or None
        case "code_details":
            return info.response_code_details
        case "flags":
            return 0
        case "grpc_status":
            return None
        case "headers":
            return _headers_map(h)
        case "trailers":
            return _headers_map(info.response_trailers)
        case "headers_bytes":
            return h.byte_size() if h else 0
        case "size":
            return info.response_size
        case "total_size":
            return info.response_size + (h.byte_size() if h else 0)
        case "backend_latency":
            return info.backend_latency_ns or None
    return None


def _address(address: str, field: str) -> Value:
    if not address:
        return None
    if field == "address":
        return address
    if field == "port":
        return _split_hostport(address)[1]
    return None


_PLUGIN: dict[str, Callable[[PluginSpec], Value]] = {
    "plugin_name": lambda spec: spec.name,
    "plugin_root_id": lambda spec: spec.root_id,
    "plugin_vm_id": lambda spec: spec.vm_id,
    "listener_direction": lambda spec: spec.listener_direction,
    "xds.listener_direction": lambda spec: spec.listener_direction,
}


def _metadata_value(v: Any) -> Value:
    """A node metadata value the way Envoy serializes a `google.protobuf.Value`: strings raw,
    numbers as an 8-byte double, bools one byte, null as no bytes; a nested struct is a map
    (pairs format, each value by these rules; Istio reads LABELS that way), a list the pairs
    format with the elements as keys."""
    if v is None:
        return b""
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float):
        return struct.pack("<d", float(v))
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping):
        return serialize_pairs((encode(str(k)), encode(_metadata_value(x))) for k, x in v.items())
    if isinstance(v, Sequence):
        return serialize_pairs((encode(_metadata_value(x)), b"") for x in v)
    return None


def _node(node: NodeInfo, rest: list[str]) -> Value:
    """`node` / `xds.node`: the whole Node as protobuf, or one field; metadata indexes deeper."""
    if not rest:
        return protobuf.node(node.id, node.cluster, node.metadata)
    field, rest = rest[0], rest[1:]
    if field == "id" and not rest:
        return node.id
    if field == "cluster" and not rest:
        return node.cluster
    if field != "metadata":
        return None
    if not rest:
        return protobuf.struct_message(node.metadata)  # an empty Struct is no bytes, and valid
    value: Any = node.metadata
    for seg in rest:
        if isinstance(value, Mapping) and seg in value:
            value = value[seg]
        elif isinstance(value, list) and seg.isdigit() and int(seg) < len(value):
            value = value[int(seg)]
        else:
            return None
    return _metadata_value(value)


def lookup(segments: list[str], spec: PluginSpec, info: StreamInfo | None) -> Value:
    """The property at `segments`, or None if it does not exist (NOT_FOUND)."""
    if not segments:
        return None
    top = segments[0]
    if top in _PLUGIN:
        return _PLUGIN[top](spec) if len(segments) == 1 else None
    if top in ("node", "xds.node"):
        return _node(spec.node, segments[1:])
    if info is None:
        return None
    value: Value = None
    rest = segments[1:]
    if top in ("request", "response", "source", "destination", "upstream", "connection") and rest:
        field = rest[0]
        rest = rest[1:]
        if top == "request":
            value = _request(info, field)
        elif top == "response":
            value = _response(info, field)
        elif top == "source":
            value = _address(info.source_address, field)
        elif top == "destination":
            value = _address(info.destination_address, field)
        elif top == "upstream":
            if field == "tls_version":
                value = info.upstream_tls_version or None
            else:
                value = _address(info.upstream_address, field)
        elif field == "id":
            value = info.connection_id
        elif info.connection_properties is not None:
            value = info.connection_properties.get(field)
        elif field == "mtls":
            value = False
    elif top == "connection_id" and not rest:
        return info.connection_id
    elif top in ("route_name", "xds.route_name") and not rest:
        return info.route_name
    elif top in ("cluster_name", "xds.cluster_name") and not rest:
        return info.cluster_name
    elif not rest:
        return info.filter_state.get(top)
    # Map values index one level deeper (request.headers.<name>).
    for seg in rest:
        if isinstance(value, dict):
            value = value.get(seg.lower())
        else:
            return None
    return value
