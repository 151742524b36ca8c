"""The narrow interface between the proxy-wasm host (`abi`) and whatever serves HTTP (`proxy`).

Everything the proxy needs from `abi` is re-exported from `sluice/abi/__init__.py`; everything `abi` needs
from the proxy is one `Host` object (services) and one `StreamCallbacks` object per stream (events).
Neither side sees the other's internals: no wasmtime here, no aiohttp there.

Flow of one request through one filter (Envoy's filter-manager vocabulary):

    stream = plugin.new_stream(info, callbacks)
    stream.request_headers(headers, end_of_stream)  -> FilterStatus.CONTINUE | STOP
    stream.request_body(buffer, end_of_stream)      -> CONTINUE | STOP (STOP = keep buffering)
    stream.request_trailers(trailers)               -> CONTINUE | STOP
    stream.response_headers(...) / response_body(...) / response_trailers(...)
    stream.complete()                               # proxy_on_log, proxy_on_done, proxy_on_delete

A STOP on headers holds the stream until the filter resumes it, which the host reports through
`callbacks.continue_request()` / `continue_response()`, or until it replies locally
(`callbacks.send_local_reply`) or resets (`callbacks.reset`). Those events are delivered after the
VM callback that caused them has returned, never from inside wasm.

Body buffers are `bytearray`s owned by the proxy. The filter may read and rewrite them in place;
after CONTINUE the proxy forwards the buffer's current content. After STOP the proxy keeps
appending chunks to the same buffer and calls the filter again with the accumulated body.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .headers import HeaderMap
from .types import FailurePolicy, LogLevel

DEFAULT_MEMORY_LIMIT = 64 << 20
DEFAULT_CPU_DEADLINE_MS = 20.0


class PluginLoadError(Exception):
    """A filter could not be loaded: the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """The proxy's identity as Envoy's bootstrap `node` gives it (property `node`)."""

    id: str = ""
    cluster: str = ""
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """JSON-like values (str, int/float, bool, None, lists, string-keyed maps): a Struct."""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a filter may do beyond its own stream (the WASI model: granted, never ambient).

    The defaults grant everything today's filters use, so a filter without a `capabilities:`
    block behaves as before; each field narrows one kind of call. A denied call answers an ABI
    status and is counted under ``capability.<field>`` in `PluginCounters.refused`.
    """

    http_call: tuple[str, ...] | None = None
    """Clusters `proxy_http_call` may reach (None: any). Others answer BAD_ARGUMENT, the answer
    for an unknown cluster, so a filter cannot tell "forbidden" from "absent"."""
    shared_data_write: bool = True
    """`proxy_set_shared_data` and `sluice_shared_data_delete`; False answers UNIMPLEMENTED."""
    queue_vm_ids: tuple[str, ...] | None = None
    """Other `vm_id`s whose queues `proxy_resolve_shared_queue` may find (None: any; the
    filter's own is always visible). Others answer NOT_FOUND. Shared data has no vm_id
    argument in the ABI: a filter only ever sees its own namespace."""
    properties: tuple[str, ...] | None = None
    """Property path prefixes `proxy_get_property` may read, dotted (`request`, `request.path`,
    `connection`, `node`); None: all. Others answer NOT_FOUND, as a property that is not there."""
    environment: tuple[str, ...] | None = None
    """Names from `PluginSpec.environment` the filter sees through WASI (None: all of them)."""
    local_reply: bool = True
    """`proxy_send_local_response`; False answers UNIMPLEMENTED (the call is not offered)."""

    def property_allowed(self, segments: list[str]) -> bool:
        allowed = self.properties
        if allowed is None:
            return True
        # Compared dotted, so `request.path` given as one segment or as two reads the same, and
        # so do Envoy's dotted top-level names (`xds.route_name`).
        path = ".".join(segments)
        return any(path == prefix or path.startswith(prefix + ".") for prefix in allowed)


@dataclasses.dataclass(frozen=True)
class FilterLimits:
    """Bounds on what one filter can make the host hold. A call that would go beyond one answers
    BAD_ARGUMENT (the status Envoy gives a call it cannot carry out) and is counted under
    ``limit.<field>`` in `PluginCounters.refused`; the filter and its VM go on serving."""

    max_callouts: int = 64
    """Outstanding `proxy_http_call`s per root context (one per VM)."""
    max_header_bytes: int = 256 << 10
    """Keys plus values of one header map, as a filter's write would leave it."""
    max_headers: int = 1024
    """Entries in one header map, as a filter's write would leave it."""
    max_body_bytes: int = 8 << 20
    """One request or response body, as `proxy_set_buffer_bytes` would leave it."""
    max_shared_keys: int = 100_000
    """Keys in the filter's `vm_id` shared-data namespace."""
    max_shared_bytes: int = 64 << 20
    """Keys plus values in the filter's `vm_id` shared-data namespace."""
    max_queues: int = 1024
    """Shared queues registered in the filter's `vm_id`."""
    max_queue_depth: int = 10_000
    """Items waiting in one shared queue (an enqueue beyond it is refused)."""
    max_metrics: int = 1000
    """Distinct metrics the filter defines. Each definition of a name is a new id (Envoy); the
    ids of re-definitions are kept up to 16 times this, the oldest forgotten first."""


@dataclasses.dataclass(frozen=True)
class PluginSpec:
    """One configured filter: which module, with what configuration, under which limits."""

    name: str
    module_path: Path
    configuration: bytes = b""
    """Plugin configuration, delivered to `proxy_on_configure` (the proxy passes JSON)."""
    vm_configuration: bytes = b""
    """VM configuration, delivered to `proxy_on_vm_start`."""
    vm_id: str = ""
    """Namespace of shared data and queues. Filters with the same vm_id share them."""
    root_id: str = ""
    failure_policy: FailurePolicy = FailurePolicy.FAIL_CLOSED
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    cpu_deadline_ms: float = DEFAULT_CPU_DEADLINE_MS
    environment: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """WASI environment variables the filter sees (nothing from the proxy's own environment)."""
    log_level: LogLevel = LogLevel.INFO
    reload_backoff_s: float = 1.0
    """First wait before a `reload` policy recreates a failed VM; doubles up to 60 s."""
    node: NodeInfo = dataclasses.field(default_factory=NodeInfo)
    """Property `node` / `xds.node`."""
    listener_direction: int = 0
    """Property `listener_direction` / `xds.listener_direction`: Envoy's TrafficDirection
    (0 unspecified, 1 inbound, 2 outbound)."""
    strict_imports: bool = False
    """Refuse a module importing `env.proxy_*` host calls sluice does not define (by default they
    are linked to stubs answering UNIMPLEMENTED)."""
    capabilities: Capabilities = Capabilities()
    limits: FilterLimits = FilterLimits()


@dataclasses.dataclass(frozen=True)
class CallResponse:
    """The answer to a `proxy_http_call`, as the proxy received it."""

    headers: HeaderMap
    """Response headers, `:status` first."""
    body: bytes = b""
    trailers: HeaderMap = dataclasses.field(default_factory=HeaderMap)


@dataclasses.dataclass(frozen=True)
class LocalReply:
    """A response generated by a filter (`proxy_send_local_response`) or by the host on failure."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    """Extra headers, appended to the generated response."""
    details: str = ""
    """Response code details (Envoy: spaces replaced by `_`)."""
    grpc_status: int | None = None


class Cancellable(Protocol):
    def cancel(self) -> object: ...


class Host(Protocol):
    """Services the proxy provides to every filter. All calls happen on the proxy's thread."""

    def http_call(
        self,
        upstream: str,
        headers: HeaderMap,
        body: bytes,
        trailers: HeaderMap,
        timeout_s: float | None,
        on_response: Callable[[CallResponse | None], None],
    ) -> bool:
        """Start an HTTP callout to a cluster by name (or `host:port`).

        Returns False at once if `upstream` is unknown. Otherwise `on_response` is called later,
        exactly once, with the response, or with None when the call failed (connect error, reset,
        timeout). It must not be called before `http_call` returns.
        """
        ...

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Cancellable:
        """Run `callback` on the proxy's thread after `delay_s` seconds (ticks, reload backoff)."""
        ...

    def log(self, plugin: str, level: LogLevel, message: str) -> None:
        """A line from a filter (proxy_log, WASI stdout/stderr) or about it (traps, load errors)."""
        ...


REDIS_CALL_FAILED = 1
"""`proxy_on_redis_call_response` status: no answer (unreachable, connection broken)."""
REDIS_CALL_TIMEOUT = 2
"""`proxy_on_redis_call_response` status: no answer within the timeout."""


@runtime_checkable
class RedisHost(Protocol):
    """What a `Host` also offers to serve Higress's Redis calls (ABI 0.2.100, docs/abi.md).

    A host without these methods answers the Redis calls with UNIMPLEMENTED.
    """

    def redis_init(self, cluster: str, username: str, password: str, timeout_s: float | None) -> bool:
        """Whether `cluster` is a Redis cluster this host can reach (credentials override the config's)."""
        ...

    def redis_call(self, cluster: str, query: bytes, on_response: Callable[[bytes | None, int], None]) -> bool:
        """Send one RESP command; False at once if the cluster is unknown or the query malformed.

        Otherwise `on_response(reply_resp_bytes, 0)` or `on_response(None, REDIS_CALL_FAILED or
        REDIS_CALL_TIMEOUT)` later, exactly once, never before this returns.
        """
        ...


class StreamCallbacks(Protocol):
    """Events a filter raises on its stream outside the return value of the current callback."""

    def continue_request(self) -> None: ...

    def continue_response(self) -> None: ...

    def send_local_reply(self, reply: LocalReply) -> None: ...

    def reset(self) -> None: ...


class StreamInfo:
    """What the proxy knows about a stream; the source of the well-known properties.

    The proxy fills in what it learns as the stream proceeds (response code, upstream address...).
    One `StreamInfo` is shared by every filter of the stream, like Envoy's stream info.

    A plain class with class-level defaults, not a dataclass: one is made per request, and an
    instance then holds only the fields set on it (a generated `__init__` assigning all 22 cost
    more than the rest of a request's bookkeeping).
    """

    def __init__(self, **fields: Any) -> None:
        self.start_time_ns = time.time_ns()
        self.filter_state = {}
        for name, value in fields.items():
            if not hasattr(StreamInfo, name):
                raise TypeError(f"StreamInfo has no field {name!r}")
            setattr(self, name, value)

    source_address: str = "127.0.0.1:0"
    destination_address: str = "127.0.0.1:0"
    connection_id: int = 0
    protocol: str = "HTTP/1.1"
    scheme: str = "http"
    start_time_ns: int = 0
    request_headers: HeaderMap | None = None
    response_headers: HeaderMap | None = None
    response_trailers: HeaderMap | None = None
    request_size: int = 0
    response_size: int = 0
    response_code: int = 0
    response_code_details: str = ""
    upstream_address: str = ""
    route_name: str = ""
    cluster_name: str = ""
    duration_ns: int = 0
    backend_latency_ns: int = 0
    filter_state: dict[str, bytes] = {}  # noqa: RUF012 - each instance gets its own in __init__
    """Values set by `proxy_set_property`, shared by the stream's filters."""
    connection_properties: Mapping[str, str | bool] | None = None
    """A TLS connection's `connection.<name>` properties (`tls_version`, `requested_server_name`,
    `mtls`, `subject_peer_certificate`, `uri_san_peer_certificate`, ...); None: not TLS."""
    upstream_tls_version: str = ""
    """`upstream.tls_version` (`TLSv1.3`); "" when the upstream connection is not TLS."""
