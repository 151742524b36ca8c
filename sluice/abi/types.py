"""Numeric enumerations of the proxy-wasm ABI and the host's own policy enums.

Values are the ones on the wire (reference section 3); do not renumber.
"""

from __future__ import annotations

import enum


class WasmResult(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_ARGUMENT = 2
    SERIALIZATION_FAILURE = 3
    PARSE_FAILURE = 4
    BAD_EXPRESSION = 5
    INVALID_MEMORY_ACCESS = 6
    EMPTY = 7
    CAS_MISMATCH = 8
    RESULT_MISMATCH = 9
    INTERNAL_FAILURE = 10
    BROKEN_CONNECTION = 11
    UNIMPLEMENTED = 12


class LogLevel(enum.IntEnum):
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5

    @classmethod
    def parse(cls, name: str) -> LogLevel:
        key = name.strip().upper()
        if key == "WARNING":
            key = "WARN"
        try:
            return cls[key]
        except KeyError:
            choices = ", ".join(m.name.lower() for m in cls)
            raise ValueError(f"unknown log level {name!r} (one of: {choices})") from None


class MapType(enum.IntEnum):
    HTTP_REQUEST_HEADERS = 0
    HTTP_REQUEST_TRAILERS = 1
    HTTP_RESPONSE_HEADERS = 2
    HTTP_RESPONSE_TRAILERS = 3
    GRPC_CALL_INITIAL_METADATA = 4
    GRPC_CALL_TRAILING_METADATA = 5
    HTTP_CALL_RESPONSE_HEADERS = 6
    HTTP_CALL_RESPONSE_TRAILERS = 7


class BufferType(enum.IntEnum):
    HTTP_REQUEST_BODY = 0
    HTTP_RESPONSE_BODY = 1
    DOWNSTREAM_DATA = 2
    UPSTREAM_DATA = 3
    HTTP_CALL_RESPONSE_BODY = 4
    GRPC_CALL_MESSAGE = 5
    VM_CONFIGURATION = 6
    PLUGIN_CONFIGURATION = 7
    FOREIGN_FUNCTION_ARGUMENTS = 8
    REDIS_CALL_RESPONSE = 9
    """Higress (ABI 0.2.100): the Redis reply being delivered to proxy_on_redis_call_response."""


class StreamType(enum.IntEnum):
    HTTP_REQUEST = 0
    HTTP_RESPONSE = 1
    DOWNSTREAM = 2
    UPSTREAM = 3


class MetricType(enum.IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


class FilterStatus(enum.IntEnum):
    """What one filter tells the chain after a stream callback (Envoy's filter-manager vocabulary)."""

    CONTINUE = 0
    """Pass this phase on to the next filter."""
    STOP = 1
    """Hold the stream here. For headers: until the filter continues it (or replied locally).
    For a body: buffer, and call the filter again with everything received so far."""


class FailurePolicy(enum.Enum):
    FAIL_CLOSED = "fail_closed"
    """A failed filter answers its request with a local 503 (Envoy's default)."""
    FAIL_OPEN = "fail_open"
    """A failed filter is skipped for the request."""
    RELOAD = "reload"
    """A failed filter gets a fresh VM for the next request, with exponential backoff; fail_closed meanwhile."""
