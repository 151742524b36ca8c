"""The config's value types: addresses, sizes, durations, counts, names, filter payloads.

Each is a plain type with a pydantic validator that explains a bad value in the config's terms.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, GetCoreSchemaHandler, PlainValidator
from pydantic_core import core_schema

from .errors import describe

__all__ = [
    "MAX_WORKERS",
    "GiB",
    "KiB",
    "MiB",
    "Count",
    "HostPort",
    "Name",
    "Seconds",
    "Size",
    "Workers",
    "format_host_port",
    "payload_bytes",
    "resolve_workers",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (``[::1]:8080``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        return format_host_port(self.host, self.port)

    @classmethod
    def _validate(cls, value: object) -> HostPort:
        if isinstance(value, HostPort):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        raise ValueError(f"must be host:port as a string, e.g. 127.0.0.1:8080 (got {describe(value)})")

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._validate, serialization=core_schema.to_string_ser_schema()
        )


_SIZE_RE = re.compile(r"(\d+)\s*([A-Za-z]*)")
_SIZE_UNITS = {"": 1, "b": 1, "kib": KiB, "mib": MiB, "gib": GiB}


def parse_size(value: object) -> object:
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
        f"(got {describe(value)})"
    )


Size = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]
"""Bytes; accepts ints and strings with a binary unit ("64MiB")."""


def not_bool(value: object) -> object:
    # pydantic's lax mode reads true as 1; `timeout: true` is a mistake, not one second.
    if isinstance(value, bool):
        raise ValueError(f"must be a number (got {describe(value)})")
    return value


Seconds = Annotated[float, BeforeValidator(not_bool), Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, BeforeValidator(not_bool), Field(gt=0)]

MAX_WORKERS = 256


def _workers(value: object) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    raise ValueError(f"must be a number of processes from 1 to {MAX_WORKERS}, or auto (got {describe(value)})")


Workers = Annotated[int | Literal["auto"], PlainValidator(_workers)]
"""`workers:` a count of processes (1..256) or `auto` (docs/scaling.md)."""


def resolve_workers(value: int | Literal["auto"]) -> int:
    """The number of worker processes `workers:` asks for on this host (`auto`: one per core)."""
    if value == "auto":
        cores = getattr(os, "process_cpu_count", os.cpu_count)() or 1
        return max(1, min(cores, MAX_WORKERS))
    return value

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

TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def payload_bytes(value: Any) -> bytes:
    """Configuration bytes for a filter: a string as is, anything else as compact JSON."""
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
