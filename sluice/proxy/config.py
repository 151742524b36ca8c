"""sluice's configuration: YAML in, a validated `SluiceConfig` out (contract: docs/config-model.md).

Every problem is reported as ``file:line: yaml.path: message``, and all of them at once, so a
broken config can be fixed in one pass. To get there the YAML is composed into nodes first (which
keep their line numbers), the lines of every key and list item are indexed by path, and only then
are the nodes turned into plain Python values for pydantic. Each pydantic error's ``loc`` is a path
into those values, so it finds its line in the index.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, core_schema

from sluice import abi

from .config_scaling import SharedDataConfig, Workers

__all__ = [
    "AdminConfig",
    "ClusterConfig",
    "ConfigError",
    "FilterConfig",
    "HostPort",
    "RouteConfig",
    "RouteMatch",
    "SluiceConfig",
    "load_config",
    "parse_config",
]

Loc = tuple[str | int, ...]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


class ConfigError(Exception):
    """The configuration is invalid. `errors` holds one ``file:line: path: message`` per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


# -- value types -----------------------------------------------------------------------------------


def _describe(value: object) -> str:
    """How a YAML value reads back to the user in an error message (never a Python repr dump)."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return str(value)


# Hostnames as in RFC 1123, plus '_' because container and compose service names use it.
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")


@dataclasses.dataclass(frozen=True)
class HostPort:
    """An address as written in the config: ``127.0.0.1:8080``, ``[::1]:8080``, ``localhost:80``.

    The host is kept as written (no DNS at load time); IPv6 hosts are stored without brackets.
    """

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        text = text.strip()
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ValueError(f"missing ']' in {text!r}")
            host, rest = text[1:end], text[end + 1 :]
            if not rest.startswith(":"):
                raise ValueError(f"expected [ipv6]:port, e.g. [::1]:8080 (got {text!r})")
            port_text = rest[1:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise ValueError(f"expected host:port, e.g. 127.0.0.1:8080 (got {text!r})")
            if ":" in host:
                raise ValueError(f"an IPv6 address needs brackets, e.g. [::1]:8080 (got {text!r})")
            if not host:
                raise ValueError(f"missing host before ':{port_text}' (use 0.0.0.0 for all interfaces)")
            if not _HOSTNAME_RE.fullmatch(host):
                raise ValueError(f"invalid host {host!r}")
        # isdecimal() also accepts non-ASCII digits, which int() would happily convert.
        if not (port_text.isascii() and port_text.isdigit()):
            raise ValueError(f"port must be a number (got {port_text!r} in {text!r})")
        port = int(port_text)
        if port > 65535:
            raise ValueError(f"port must be at most 65535 (got {port})")
        return cls(host, port)

    @property
    def is_loopback(self) -> bool:
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            # Any other name could resolve to anything, so it does not count as loopback.
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def _validate(cls, value: object) -> HostPort:
        if isinstance(value, HostPort):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        raise ValueError(f"must be host:port as a string, e.g. 127.0.0.1:8080 (got {_describe(value)})")

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.to_string_ser_schema()
        )


_SIZE_RE = re.compile(r"(\d+)\s*([A-Za-z]*)")
_SIZE_UNITS = {"": 1, "b": 1, "kib": KiB, "mib": MiB, "gib": GiB}


def _parse_size(value: object) -> object:
    # bool is an int subclass; `memory_limit: true` is a mistake, not 1 byte.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m:
            unit = _SIZE_UNITS.get(m[2].lower())
            if unit is None:
                raise ValueError(f"unknown size unit {m[2]!r} in {value!r} (use B, KiB, MiB or GiB)")
            return int(m[1]) * unit
    raise ValueError(
        f'must be a size in bytes: a whole number or a string like "64MiB", "512KiB", "1GiB" '
        f"(got {_describe(value)})"
    )


Size = Annotated[int, BeforeValidator(_parse_size), Field(gt=0)]
"""Bytes; accepts ints and strings with a binary unit ("64MiB")."""


def _not_bool(value: object) -> object:
    # pydantic's lax mode reads true as 1; `timeout: true` is a mistake, not one second.
    if isinstance(value, bool):
        raise ValueError(f"must be a number (got {_describe(value)})")
    return value


Seconds = Annotated[float, BeforeValidator(_not_bool), Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, BeforeValidator(_not_bool), Field(gt=0)]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_name(value: str) -> str:
    # Names end up in logs, metric labels and `http_call` upstream names; a ':' would make a
    # cluster name look like host:port there.
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid name {value!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _payload_bytes(value: Any) -> bytes:
    """Configuration bytes for a filter: a string as is, anything else as compact JSON."""
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _context(info: ValidationInfo) -> Mapping[str, Any]:
    return info.context if isinstance(info.context, Mapping) else {}


def _base_dir(info: ValidationInfo) -> Path:
    base = _context(info).get("base_dir")
    return Path(base) if base is not None else Path(".")


# -- models ----------------------------------------------------------------------------------------


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
    username: str | None = Field(default=None, min_length=1)
    password: str | None = Field(default=None, min_length=1)
    tls: bool = False
    database: Annotated[int, BeforeValidator(_not_bool), Field(ge=0)] = 0

    @field_validator("endpoints")
    @classmethod
    def _real_ports(cls, endpoints: list[HostPort]) -> list[HostPort]:
        # Port 0 means "any free port" for a listener; it cannot be connected to.
        for endpoint in endpoints:
            if endpoint.port == 0:
                raise ValueError(f"endpoint {endpoint} has port 0")
        return endpoints


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
            _payload_bytes(value)
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

    def configuration_bytes(self) -> bytes:
        """What `proxy_on_configure` receives: `config` as compact JSON (a string as is, null: empty)."""
        return _payload_bytes(self.config)

    def vm_configuration_bytes(self) -> bytes:
        """What `proxy_on_vm_start` receives, encoded like `configuration_bytes`."""
        return _payload_bytes(self.vm_config)

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
        )


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
            if not _TOKEN_RE.fullmatch(lowered.removeprefix(":")):
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
            if not _TOKEN_RE.fullmatch(method):
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


class RouteConfig(_Model):
    match: RouteMatch
    cluster: str
    name: str | None = None


class SluiceConfig(_Model):
    listen: HostPort
    admin: AdminConfig = Field(default_factory=AdminConfig)
    filters_dir: Path = Field(default=Path("filters"), validate_default=True)
    clusters: dict[Name, ClusterConfig] = Field(default_factory=dict)
    chain: list[FilterConfig] = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)
    max_body_buffer: Size = 1 * MiB
    max_request_header_size: Size = 8192
    drain_timeout: Annotated[float, BeforeValidator(_not_bool), Field(ge=0, allow_inf_nan=False)] = 30.0
    access_log: str | None = Field(default="stdout", min_length=1)
    cache_dir: Path = Field(default=Path(".sluice-cache"), validate_default=True)
    workers: Workers = 1
    shared_data: SharedDataConfig = Field(default_factory=SharedDataConfig)

    _source_path: Path | None = PrivateAttr(default=None)
    _source_name: str = PrivateAttr(default="<config>")
    _lines: dict[tuple[str, ...], int] = PrivateAttr(default_factory=dict)

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
            problems = _cross_check(self)
            if problems:
                raise ValueError("; ".join(f"{_format_loc(loc)}: {msg}" for loc, msg in problems))
        return self

    def line_of(self, *loc: str | int) -> int | None:
        """The YAML line of a key or list item, e.g. `line_of("chain", 0)`; None if unknown."""
        return self._lines.get(_line_key(loc))

    def where(self, *loc: str | int) -> str:
        """``file:line: path`` for messages about part of this config, e.g. ``where("chain", 2)``."""
        line = _line_for(self._lines, loc) if self._lines else None
        prefix = f"{self._source_name}:{line}" if line is not None else self._source_name
        return f"{prefix}: {_format_loc(loc)}"


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


def _cross_check(data: object) -> list[tuple[Loc, str]]:
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

    listen = _as_hostport(_field(data, "listen"))
    admin_listen = _as_hostport(_field(_field(data, "admin"), "listen"))
    if listen is not None and listen == admin_listen and listen.port != 0:
        problems.append((("admin", "listen"), f"same address as listen ({listen})"))
    return problems


# -- YAML with line numbers ------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


# `listen: [::1]:8080` unquoted is a YAML flow sequence followed by junk: a syntax error whose
# message says nothing about addresses.
_BARE_IPV6_RE = re.compile(r"(?<![\"'])\[[0-9A-Fa-f:.%]*\]:\d")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and no timestamps.

    YAML 1.1 reads `on`, `off`, `yes`, `no` as booleans and `2024-01-01` as a date; in a header
    value or a filter's JSON config those are nearly always meant as text (and a date is not JSON).
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _index_lines(
    node: yaml.Node,
    loc: Loc,
    lines: dict[tuple[str, ...], int],
    duplicates: list[tuple[Loc, int, str]],
    active: set[int],
) -> None:
    """Record the 1-based line of every mapping key and sequence item under `node`, by path."""
    if id(node) in active:  # a recursive alias (`&a [*a]`)
        return
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            # Merge keys (`<<: *defaults`) and complex keys have no path of their own; their
            # values' errors fall back to the enclosing key's line.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            child: Loc = (*loc, key)
            if key in first_line:
                duplicates.append(
                    (child, line, f"duplicate key {key!r} (first given on line {first_line[key]})")
                )
                continue
            first_line[key] = line
            lines[_line_key(child)] = line
            _index_lines(value_node, child, lines, duplicates, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*loc, index)
            lines[_line_key(child)] = item.start_mark.line + 1
            _index_lines(item, child, lines, duplicates, active)
    active.discard(id(node))


def _line_key(loc: Loc) -> tuple[str, ...]:
    # pydantic reports list indices as ints and dict keys as (possibly coerced) strings; strings
    # on both sides make `("routes", 0)` and a YAML key "0" compare equal where they must.
    return tuple(str(part) for part in loc)


def _load_yaml(
    text: str, source: str
) -> tuple[object, dict[tuple[str, ...], int], list[tuple[Loc, int, str]]]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines: dict[tuple[str, ...], int] = {}
        duplicates: list[tuple[Loc, int, str]] = []
        if node is None:
            return None, lines, duplicates
        lines[()] = node.start_mark.line + 1
        _index_lines(node, (), lines, duplicates, set())
        data = loader.construct_document(node)
        return data, lines, duplicates
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        message = exc.problem or exc.context or "invalid YAML"
        if exc.problem and exc.context:
            if exc.problem.startswith("but "):  # the composer's "expected X ... but found Y"
                message = f"{exc.context}, {exc.problem}"
            else:
                message += f" ({exc.context}"
                if exc.context_mark is not None and exc.context_mark.line + 1 != line:
                    message += f" that starts on line {exc.context_mark.line + 1}"
                message += ")"
        source_lines = text.splitlines()
        if 0 < line <= len(source_lines) and _BARE_IPV6_RE.search(source_lines[line - 1]):
            message += '; an IPv6 address must be quoted, e.g. "[::1]:8080"'
        raise ConfigError([f"{source}:{line}: YAML syntax error: {message}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: YAML error: {exc}"]) from None
    finally:
        loader.dispose()


# -- error messages --------------------------------------------------------------------------------

_SIMPLE_KEY_RE = re.compile(r"[A-Za-z0-9_:-]+")


def _format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY_RE.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out or "(top level)"


def _line_for(lines: Mapping[tuple[str, ...], int], loc: Loc) -> int:
    """The line of `loc`, or of its nearest ancestor present in the file (e.g. for missing keys)."""
    key = _line_key(loc)
    while key:
        if key in lines:
            return lines[key]
        key = key[:-1]
    return lines.get((), 1)


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X (field annotations as pydantic resolved them)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """Which model validates the value at `loc` (to list the keys it allows)."""
    current: Any = SluiceConfig
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) in (list, dict):
            current = get_args(current)[-1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unknown_key(loc: Loc) -> str:
    key = str(loc[-1])
    model = _model_at(loc[:-1])
    if model is None:
        return f"unknown key {key!r}"
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    return f"unknown key {key!r} (allowed: {', '.join(allowed)})"


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _message(error: ErrorDetails) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    got = _describe(value)
    if kind == "invalid_key":
        return f"keys must be strings (got {_describe(error['loc'][-1])})"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return _unknown_key(error["loc"])
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"must be one of {expected} (got {got})"
    if kind == "string_type":
        hint = "; put it in quotes if it is meant as text" if isinstance(value, bool) or value is None else ""
        return f"must be a string (got {got}){hint}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number (got {got})"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"must be a number (got {got})"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false (got {got})"
    if kind == "list_type":
        return f"must be a list (got {got})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping (got {got})"
    if kind == "path_type":
        return f"must be a path (got {got})"
    if kind == "greater_than":
        return f"must be greater than {_number(ctx.get('gt'))} (got {got})"
    if kind == "greater_than_equal":
        return f"must be at least {_number(ctx.get('ge'))} (got {got})"
    if kind == "too_short":
        if ctx.get("min_length") == 1:
            return "must not be empty"
        return f"must have at least {ctx.get('min_length')} items"
    if kind == "string_too_short":
        return "must not be empty"
    return str(error["msg"])


# -- entry points ----------------------------------------------------------------------------------


def parse_config(text: str, source: str = "<string>", base_dir: Path = Path(".")) -> SluiceConfig:
    """Validate YAML text. Relative paths in it resolve against `base_dir`. Raises ConfigError."""
    data, lines, duplicates = _load_yaml(text, source)
    found: list[tuple[int, str]] = [
        (line, f"{source}:{line}: {_format_loc(path)}: {msg}") for path, line, msg in duplicates
    ]

    def report(loc: Loc, message: str) -> None:
        line = _line_for(lines, loc)
        found.append((line, f"{source}:{line}: {_format_loc(loc)}: {message}"))

    if data is None:
        data = {}  # an empty file: report the missing keys rather than "not a mapping"
    if not isinstance(data, dict):
        report(
            (), f"the file must be a mapping of keys such as listen, clusters, chain (got {_describe(data)})"
        )
        raise ConfigError([msg for _, msg in found])

    config: SluiceConfig | None = None
    try:
        config = SluiceConfig.model_validate(data, context={"base_dir": base_dir, "cross_checked": True})
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            # Errors about a dict key carry a trailing '[key]'; the key's own line is what we want.
            loc = tuple(part for part in error["loc"] if part != "[key]")
            report(loc, _message(error))
    for loc, message in _cross_check(data):
        report(loc, message)

    if found or config is None:
        unique = list(dict.fromkeys(msg for _, msg in sorted(found, key=lambda item: item[0])))
        raise ConfigError(unique)
    config._lines = lines
    config._source_name = source
    return config


def load_config(path: str | Path) -> SluiceConfig:
    """Read and validate a config file; relative paths in it are relative to its directory."""
    source = str(path)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read config: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text: {exc.reason} at byte {exc.start}"]) from None
    config = parse_config(text, source=source, base_dir=file.resolve().parent)
    config._source_path = file.resolve()
    return config
