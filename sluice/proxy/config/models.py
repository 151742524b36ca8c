"""The config's models: what each section may hold, defaults, and the checks that span sections.

`SluiceConfig` is the whole file. The models know nothing of YAML; `parse_config`
(sluice/proxy/config/load.py) validates the data and turns errors into messages with lines.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sluice import abi

from .errors import Loc, format_loc
from .listeners import ClusterTlsConfig, ListenerConfig
from .values import (
    TOKEN_RE,
    Count,
    HostPort,
    MiB,
    Name,
    Seconds,
    Size,
    Workers,
    not_bool,
    payload_bytes,
    resolve_workers,
)
from .yamlindex import LineIndex, line_for, line_key

__all__ = [
    "AdminConfig", "CapabilitiesConfig", "ClusterConfig", "FilterConfig", "LimitsConfig", "NodeConfig",
    "RouteConfig", "RouteMatch", "SharedDataBackend", "SharedDataConfig", "SluiceConfig", "TimeoutsConfig",
    "cross_check",
]

TRAFFIC_DIRECTIONS = {"unspecified": 0, "inbound": 1, "outbound": 2}
"""`traffic_direction` -> Envoy's TrafficDirection, the filters' property `listener_direction`."""


def _context(info: ValidationInfo) -> Mapping[str, Any]:
    return info.context if isinstance(info.context, Mapping) else {}


def _base_dir(info: ValidationInfo) -> Path:
    base = _context(info).get("base_dir")
    return Path(base) if base is not None else Path(".")


class _Model(BaseModel):
    # Unknown keys are errors: a misspelt optional key would otherwise be silently ignored.
    # Numbers are accepted where text is expected because YAML makes `x-version: 2` an int.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class AdminConfig(_Model):
    listen: HostPort = HostPort("127.0.0.1", 9901)
    token: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _token_when_exposed(self) -> AdminConfig:
        # The admin API can reload filters and dump config; off-host it must not be anonymous.
        if self.token is None and not self.listen.is_loopback:
            raise ValueError(f"token is required when listen ({self.listen}) is not a loopback address")
        return self


class ClusterConfig(_Model):
    type: Literal["http", "redis"] = "http"
    """`redis`: reached by filters through proxy_redis_call (sluice/proxy/redis_host.py), never routed to."""
    endpoints: list[HostPort] = Field(min_length=1)
    timeout: Seconds = 15.0
    connect_timeout: Seconds = 2.0
    host_rewrite: str | None = Field(default=None, min_length=1)
    max_connections: Count = 256
    tls: ClusterTlsConfig | None = None
    protocol: Literal["http1", "http2"] = "http1"
    """`http2`: one multiplexed connection per endpoint (TLS with ALPN h2, or h2c with prior
    knowledge without `tls:`); `max_connections` then bounds the requests in flight."""
    username: str | None = Field(default=None, min_length=1)
    password: str | None = Field(default=None, min_length=1)
    database: Annotated[int, BeforeValidator(not_bool), Field(ge=0)] = 0
    idle_timeout: Seconds = 60.0
    """Seconds without a byte from the upstream while its response streams (or while it does not
    take the request body): the request is reset, or answered 504 if nothing was sent yet."""
    request_body_prebuffer: Size = 64 * 1024
    """A request body announced (Content-Length) at most this big is read whole before a
    connection is taken: a client sending it slowly holds no connection meanwhile."""
    max_upload_connections: Count | None = None
    """Connections that requests still sending their body may hold at once (default: half of
    `max_connections`, at least 1), so slow uploaders cannot take every connection."""

    @property
    def upload_connections(self) -> int:
        if self.max_upload_connections is not None:
            return min(self.max_upload_connections, self.max_connections)
        return max(1, self.max_connections // 2)

    @field_validator("endpoints")
    @classmethod
    def _real_ports(cls, endpoints: list[HostPort]) -> list[HostPort]:
        # Port 0 means "any free port" for a listener; it cannot be connected to.
        for endpoint in endpoints:
            if endpoint.port == 0:
                raise ValueError(f"endpoint {endpoint} has port 0")
        return endpoints


_PROPERTY_SEGMENT_RE = re.compile(r"[A-Za-z0-9_\-]+")
_LIMITS = abi.FilterLimits()


class CapabilitiesConfig(_Model):
    """`capabilities:` on a chain entry: what the filter may do (abi.Capabilities). Every key
    left out grants what today's filters use; a list narrows to what it names."""

    http_call: list[str] | None = None
    shared_data_write: bool = True
    queue_vm_ids: list[str] | None = None
    properties: list[str] | None = None
    environment: list[str] | None = None
    local_reply: bool = True

    @field_validator("properties")
    @classmethod
    def _property_prefixes(cls, prefixes: list[str] | None) -> list[str] | None:
        if prefixes is None:
            return None
        out: list[str] = []
        for prefix in prefixes:
            # `request.*` and `request` mean the same: the property and everything under it.
            path = prefix.removesuffix(".*")
            if not all(_PROPERTY_SEGMENT_RE.fullmatch(seg) for seg in path.split(".")):
                raise ValueError(f"invalid property prefix {prefix!r} (dotted names, e.g. request.* or node.id)")
            out.append(path)
        return out

    def to_abi(self) -> abi.Capabilities:
        def names(value: list[str] | None) -> tuple[str, ...] | None:
            return None if value is None else tuple(value)

        return abi.Capabilities(
            http_call=names(self.http_call),
            shared_data_write=self.shared_data_write,
            queue_vm_ids=names(self.queue_vm_ids),
            properties=names(self.properties),
            environment=names(self.environment),
            local_reply=self.local_reply,
        )


class LimitsConfig(_Model):
    """`limits:` on a chain entry: what the filter can make the host hold (abi.FilterLimits)."""

    max_callouts: Count = _LIMITS.max_callouts
    max_header_bytes: Size = _LIMITS.max_header_bytes
    max_headers: Count = _LIMITS.max_headers
    max_body_bytes: Size = _LIMITS.max_body_bytes
    max_shared_keys: Count = _LIMITS.max_shared_keys
    max_shared_bytes: Size = _LIMITS.max_shared_bytes
    max_queues: Count = _LIMITS.max_queues
    max_queue_depth: Count = _LIMITS.max_queue_depth
    max_metrics: Count = _LIMITS.max_metrics

    def to_abi(self) -> abi.FilterLimits:
        return abi.FilterLimits(**self.model_dump())


class FilterConfig(_Model):
    name: Name
    module: str = Field(min_length=1)
    config: Any = None
    failure_policy: Literal["fail_closed", "fail_open", "reload"] = "fail_closed"
    vm_id: str | None = None
    root_id: str = ""
    vm_config: Any = None
    memory_limit: Size = 64 * MiB
    cpu_deadline_ms: Seconds = 20.0
    match: str | None = None
    log_level: str = "info"
    environment: dict[str, str] = Field(default_factory=dict)
    strict_imports: bool = False
    capabilities: CapabilitiesConfig = Field(default_factory=CapabilitiesConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    _module_path: Path | None = PrivateAttr(default=None)

    @property
    def module_path(self) -> Path:
        """The module file: `filters_dir / module` once part of a `SluiceConfig`, else `module`."""
        return self._module_path if self._module_path is not None else Path(self.module)

    @field_validator("config", "vm_config")
    @classmethod
    def _json_compatible(cls, value: Any) -> Any:
        # Fail at load time, not when the filter is (re)loaded in a running proxy.
        try:
            payload_bytes(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot be handed to the filter as JSON: {exc}") from None
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        return abi.LogLevel.parse(value).name.lower()

    @field_validator("match")
    @classmethod
    def _path_prefix(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must be a path prefix starting with '/' (got {value!r})")
        return value

    @field_validator("environment")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"invalid environment variable name {key!r}")
        return env

    @model_validator(mode="after")
    def _granted_environment(self) -> FilterConfig:
        granted = self.capabilities.environment
        unknown = [name for name in granted or () if name not in self.environment]
        if unknown:
            raise ValueError(
                f"capabilities.environment names variables not in environment: {', '.join(unknown)}"
            )
        return self

    def configuration_bytes(self) -> bytes:
        """What `proxy_on_configure` receives: `config` as compact JSON (a string as is, null: empty)."""
        return payload_bytes(self.config)

    def vm_configuration_bytes(self) -> bytes:
        """What `proxy_on_vm_start` receives, encoded like `configuration_bytes`."""
        return payload_bytes(self.vm_config)

    def to_plugin_spec(self) -> abi.PluginSpec:
        return abi.PluginSpec(
            name=self.name,
            module_path=self.module_path,
            configuration=self.configuration_bytes(),
            vm_configuration=self.vm_configuration_bytes(),
            vm_id=self.vm_id if self.vm_id is not None else self.name,
            root_id=self.root_id,
            failure_policy=abi.FailurePolicy(self.failure_policy),
            memory_limit=self.memory_limit,
            cpu_deadline_ms=self.cpu_deadline_ms,
            environment=dict(self.environment),
            log_level=abi.LogLevel.parse(self.log_level),
            strict_imports=self.strict_imports,
            capabilities=self.capabilities.to_abi(),
            limits=self.limits.to_abi(),
        )


class NodeConfig(_Model):
    """The proxy's identity, the filters' property `node` (Envoy's bootstrap `node`)."""

    id: str = ""
    cluster: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _struct_compatible(cls, value: dict[str, Any]) -> dict[str, Any]:
        # It becomes a google.protobuf.Struct: JSON values only.
        try:
            payload_bytes(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must hold JSON values only (it becomes a protobuf Struct): {exc}") from None
        return value

    def to_node_info(self) -> abi.NodeInfo:
        return abi.NodeInfo(id=self.id, cluster=self.cluster, metadata=self.metadata)


class RouteMatch(_Model):
    prefix: str | None = None
    path: str | None = None
    regex: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    methods: list[str] = Field(default_factory=list)

    @field_validator("prefix", "path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must start with '/' (got {value!r})")
        return value

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        # Names are stored lower-case, like HeaderMap, so matching is a plain lookup.
        out: dict[str, str] = {}
        for name, value in headers.items():
            lowered = name.lower()
            # A leading ':' allows pseudo-headers such as ':authority' (the Host).
            if not TOKEN_RE.fullmatch(lowered.removeprefix(":")):
                raise ValueError(f"invalid header name {name!r}")
            if lowered in out:
                raise ValueError(f"header {name!r} is listed twice (names are case-insensitive)")
            out[lowered] = value
        return out

    @field_validator("methods")
    @classmethod
    def _method_names(cls, methods: list[str]) -> list[str]:
        out: list[str] = []
        for method in methods:
            if not TOKEN_RE.fullmatch(method):
                raise ValueError(f"invalid method {method!r}")
            if method.upper() not in out:
                out.append(method.upper())
        return out

    @model_validator(mode="after")
    def _one_path_kind(self) -> RouteMatch:
        given = [kind for kind in ("prefix", "path", "regex") if getattr(self, kind) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of prefix, path, regex (got {' and '.join(given)})")
        return self


def _upgrade_tokens(values: list[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        if not TOKEN_RE.fullmatch(value):
            raise ValueError(f"invalid upgrade protocol {value!r}")
        if value.lower() not in out:
            out.append(value.lower())
    return out


class RouteConfig(_Model):
    match: RouteMatch
    cluster: str
    name: str | None = None
    upgrades: Annotated[list[str], AfterValidator(_upgrade_tokens)] = Field(default_factory=lambda: ["websocket"])
    """Protocols an `Upgrade` request on this route may switch to (a byte tunnel after the
    upstream's 101), like Envoy's `upgrade_configs`. Any other upgrade is stripped and the
    request proxied as plain HTTP."""


class TimeoutsConfig(_Model):
    """How long the proxy waits for a client (the upstream side is per cluster)."""

    request_headers: Seconds = 10.0
    """From the first byte of a request to the end of its head; then 408."""
    request_body_idle: Seconds = 30.0
    """Between two reads of a request body the proxy is waiting for; then 408."""
    stream: Seconds | None = None
    """Longest a request may take from its head to the end of its response (none by default);
    then 408, or a reset once the response has started."""


def _listen_kind(value: object) -> str:
    # A list of mappings is a list of listeners; anything else is read (and worded) as an address.
    if isinstance(value, list) and value and all(isinstance(v, Mapping | ListenerConfig) for v in value):
        return "[listeners]"
    return "[address]"


LISTEN_TAGS = frozenset({"[listeners]", "[address]"})
"""The union's branch names pydantic puts into error locations (load.py leaves them out)."""


class SharedDataBackend(enum.Enum):
    AUTO = "auto"
    MEMORY = "memory"
    LMDB = "lmdb"


class SharedDataConfig(_Model):
    """`shared_data:` which store proxy-wasm shared data and queues live in (docs/scaling.md).

    ```yaml
    shared_data:
      backend: auto       # memory | lmdb | auto (memory for one worker, lmdb for more)
      path: shared-data   # LMDB directory, relative to the config file; default <cache_dir>/shared-data
      map_size: 64MiB     # upper bound of the LMDB file
      max_keys: 100000    # shared-data keys, all filters together; a new key beyond it is refused
    ```
    """

    backend: SharedDataBackend = SharedDataBackend.AUTO
    path: Path | None = None
    map_size: Annotated[Size, Field(ge=MiB)] = 64 * MiB
    max_keys: Count = 100_000

    @field_validator("path")
    @classmethod
    def _relative_to_config(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else (_base_dir(info) / value).resolve()

    def backend_for(self, workers: int) -> SharedDataBackend:
        """The backend in effect: `auto` is the in-process store for one worker (it is faster)."""
        if self.backend is SharedDataBackend.AUTO:
            return SharedDataBackend.MEMORY if workers == 1 else SharedDataBackend.LMDB
        return self.backend

    def lmdb_path(self, cache_dir: Path) -> Path:
        return self.path if self.path is not None else cache_dir / "shared-data"


class SluiceConfig(_Model):
    listen: Annotated[
        Annotated[HostPort, Tag("[address]")] | Annotated[list[ListenerConfig], Tag("[listeners]")],
        Discriminator(_listen_kind),
    ]
    """One plain HTTP address, or a list of listeners (each with an optional `tls:`)."""
    admin: AdminConfig = Field(default_factory=AdminConfig)
    filters_dir: Path = Field(default=Path("filters"), validate_default=True)
    clusters: dict[Name, ClusterConfig] = Field(default_factory=dict)
    chain: list[FilterConfig] = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)
    max_body_buffer: Size = 1 * MiB
    max_request_header_size: Size = 8192
    drain_timeout: Annotated[float, BeforeValidator(not_bool), Field(ge=0, allow_inf_nan=False)] = 30.0
    access_log: str | None = Field(default="stdout", min_length=1)
    cache_dir: Path = Field(default=Path(".sluice-cache"), validate_default=True)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    node: NodeConfig = Field(default_factory=NodeConfig)
    traffic_direction: Literal["unspecified", "inbound", "outbound"] = "unspecified"
    workers: Workers = 1
    shared_data: SharedDataConfig = Field(default_factory=SharedDataConfig)

    _source_path: Path | None = PrivateAttr(default=None)
    _source_name: str = PrivateAttr(default="<config>")
    _lines: LineIndex = PrivateAttr(default_factory=dict)

    @field_validator("listen")
    @classmethod
    def _some_listener(cls, value: HostPort | list[ListenerConfig]) -> HostPort | list[ListenerConfig]:
        if isinstance(value, list):
            seen: set[HostPort] = set()
            for listener in value:
                if listener.address.port != 0 and listener.address in seen:
                    raise ValueError(f"address {listener.address} is listed twice")
                seen.add(listener.address)
        return value

    @property
    def listeners(self) -> list[ListenerConfig]:
        """`listen` as a list: one plain listener when it is a single address."""
        if isinstance(self.listen, HostPort):
            return [ListenerConfig(address=self.listen)]
        return self.listen

    @property
    def source_path(self) -> Path | None:
        """The file this config was loaded from (absolute), or None if it was not read from a file."""
        return self._source_path

    @field_validator("filters_dir", "cache_dir")
    @classmethod
    def _relative_to_config(cls, value: Path, info: ValidationInfo) -> Path:
        # Relative to the config file, not the working directory, so `sluice run -c` works anywhere.
        return (_base_dir(info) / value).resolve()

    @field_validator("access_log")
    @classmethod
    def _log_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or value == "stdout":
            return value
        return str((_base_dir(info) / value).resolve())

    @model_validator(mode="after")
    def _link(self, info: ValidationInfo) -> SluiceConfig:
        for entry in self.chain:
            entry._module_path = self.filters_dir / entry.module
        for index, route in enumerate(self.routes):
            if route.name is None:
                route.name = f"route{index}"
        # parse_config runs the cross-field checks itself, on the raw data, so that they are
        # reported with lines and alongside field errors; built in Python they run here.
        if not _context(info).get("cross_checked"):
            problems = cross_check(self)
            if problems:
                raise ValueError("; ".join(f"{format_loc(loc)}: {msg}" for loc, msg in problems))
        return self

    def plugin_spec(self, entry: FilterConfig) -> abi.PluginSpec:
        """What the host needs to load `entry`: the entry's own settings and the proxy's node."""
        return dataclasses.replace(
            entry.to_plugin_spec(),
            node=self.node.to_node_info(),
            listener_direction=TRAFFIC_DIRECTIONS[self.traffic_direction],
        )

    def line_of(self, *loc: str | int) -> int | None:
        """The YAML line of a key or list item, e.g. `line_of("chain", 0)`; None if unknown."""
        return self._lines.get(line_key(loc))

    def where(self, *loc: str | int) -> str:
        """``file:line: path`` for messages about part of this config, e.g. ``where("chain", 2)``."""
        line = line_for(self._lines, loc) if self._lines else None
        prefix = f"{self._source_name}:{line}" if line is not None else self._source_name
        return f"{prefix}: {format_loc(loc)}"


# -- cross-field checks ----------------------------------------------------------------------------


def _field(obj: object, key: str) -> object:
    """Read a key from raw YAML data or an attribute from a model, whichever `obj` is."""
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _as_hostport(value: object) -> HostPort | None:
    try:
        return HostPort._validate(value)
    except ValueError:
        return None


def cross_check(data: object) -> list[tuple[Loc, str]]:
    """Checks that span several parts of the config. Tolerates data that failed validation."""
    problems: list[tuple[Loc, str]] = []

    chain = _field(data, "chain")
    if isinstance(chain, list):
        seen: dict[str, int] = {}
        for index, entry in enumerate(chain):
            name = _field(entry, "name")
            if isinstance(name, str):
                if name in seen:
                    problems.append(
                        (
                            ("chain", index, "name"),
                            f"duplicate filter name {name!r} (also chain[{seen[name]}])",
                        )
                    )
                else:
                    seen[name] = index

    clusters = _field(data, "clusters")
    clusters = {} if clusters is None else clusters
    routes = _field(data, "routes")
    if isinstance(routes, list):
        route_names: dict[str, int] = {}
        for index, route in enumerate(routes):
            cluster = _field(route, "cluster")
            if isinstance(cluster, str) and isinstance(clusters, Mapping) and cluster not in clusters:
                known = ", ".join(str(k) for k in clusters) or "none are defined"
                problems.append(
                    (("routes", index, "cluster"), f"unknown cluster {cluster!r} (clusters: {known})")
                )
            name = _field(route, "name")
            # Default names are only filled in after validation, so compare the explicit ones.
            if isinstance(name, str) and not (name == f"route{index}" and isinstance(route, RouteConfig)):
                if name in route_names:
                    problems.append(
                        (
                            ("routes", index, "name"),
                            f"duplicate route name {name!r} (also routes[{route_names[name]}])",
                        )
                    )
                else:
                    route_names[name] = index

    if isinstance(chain, list) and isinstance(clusters, Mapping):
        for index, entry in enumerate(chain):
            granted = _field(_field(entry, "capabilities"), "http_call")
            for item, cluster in enumerate(granted if isinstance(granted, list) else []):
                # host:port callouts need no cluster; a bare name that is none is a typo.
                if isinstance(cluster, str) and ":" not in cluster and cluster not in clusters:
                    known = ", ".join(str(k) for k in clusters) or "none are defined"
                    problems.append(
                        (
                            ("chain", index, "capabilities", "http_call", item),
                            f"unknown cluster {cluster!r} (clusters: {known})",
                        )
                    )

    listen = _field(data, "listen")
    admin_listen = _as_hostport(_field(_field(data, "admin"), "listen"))
    addresses = [_as_hostport(_field(item, "address")) for item in listen] if isinstance(listen, list) else [
        _as_hostport(listen)
    ]
    for address in addresses:
        if address is not None and address == admin_listen and address.port != 0:
            problems.append((("admin", "listen"), f"same address as listen ({address})"))
    workers = _field(data, "workers")
    count = resolve_workers("auto") if workers == "auto" else workers
    if isinstance(listen, list) and isinstance(count, int) and not isinstance(count, bool) and count > 1:
        # Each worker binds one SO_REUSEPORT socket; a list of listeners (TLS) is not fanned out yet.
        problems.append((("workers",), "more than one worker needs `listen` as one address (a list of listeners "
                                       "runs with workers: 1)"))
    return problems
