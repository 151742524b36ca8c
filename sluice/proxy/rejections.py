"""Requests the proxy refuses for what the client sent: the reasons, the reply, the count, the log.

A refused request never reaches a filter or an upstream. Each `Rejection` has one status and a
fixed body; the reply is sluice's own (HTTP/1.1, `server: sluice`, `connection: close`) and never
echoes the client's bytes. Every one is counted by reason (`ProxyStats.rejections`, exported as
`sluice_rejections_total{reason}`) and logged as one WARN line without a traceback, at most
`LOG_BURST` lines per `LOG_WINDOW_S` (a hostile client must not be able to flood the log), with
the number left out said in the next line that is written.
"""

from __future__ import annotations

import enum
import logging
import time

from .h1 import response_head
from .stats import ProxyStats

log = logging.getLogger("sluice.server")

LOG_WINDOW_S = 10.0
LOG_BURST = 20


class Rejection(enum.Enum):
    """Why a request was refused; the value is the reason label of its counter."""

    BAD_REQUEST = "bad_request"
    BAD_REQUEST_BODY = "bad_request_body"
    REQUEST_HEADERS_TOO_LARGE = "request_headers_too_large"
    REQUEST_LINE_TOO_LONG = "request_line_too_long"
    UNSUPPORTED_TRANSFER_CODING = "unsupported_transfer_coding"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HTTP_VERSION_NOT_SUPPORTED = "http_version_not_supported"
    REQUEST_HEADER_TIMEOUT = "request_header_timeout"
    REQUEST_BODY_TIMEOUT = "request_body_timeout"
    STREAM_TIMEOUT = "stream_timeout"

    @property
    def status(self) -> int:
        return _STATUS[self]

    @property
    def body(self) -> bytes:
        return _BODY[self]


_STATUS = {
    Rejection.BAD_REQUEST: 400,
    Rejection.BAD_REQUEST_BODY: 400,
    Rejection.REQUEST_HEADERS_TOO_LARGE: 431,
    Rejection.REQUEST_LINE_TOO_LONG: 414,
    Rejection.UNSUPPORTED_TRANSFER_CODING: 501,
    Rejection.METHOD_NOT_ALLOWED: 405,
    Rejection.HTTP_VERSION_NOT_SUPPORTED: 505,
    Rejection.REQUEST_HEADER_TIMEOUT: 408,
    Rejection.REQUEST_BODY_TIMEOUT: 408,
    Rejection.STREAM_TIMEOUT: 408,
}

_BODY = {
    Rejection.BAD_REQUEST: b"bad request\n",
    Rejection.BAD_REQUEST_BODY: b"bad request body\n",
    Rejection.REQUEST_HEADERS_TOO_LARGE: b"request headers too large\n",
    Rejection.REQUEST_LINE_TOO_LONG: b"request line too long\n",
    Rejection.UNSUPPORTED_TRANSFER_CODING: b"transfer coding not implemented\n",
    Rejection.METHOD_NOT_ALLOWED: b"method not allowed\n",
    Rejection.HTTP_VERSION_NOT_SUPPORTED: b"http version not supported\n",
    Rejection.REQUEST_HEADER_TIMEOUT: b"request header timeout\n",
    Rejection.REQUEST_BODY_TIMEOUT: b"request body timeout\n",
    Rejection.STREAM_TIMEOUT: b"request timeout\n",
}

_EXTRA: dict[Rejection, tuple[tuple[str, str], ...]] = {
    Rejection.METHOD_NOT_ALLOWED: (("allow", "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"),),
}


def reply_bytes(rejection: Rejection) -> bytes:
    """The whole response for a refused request, as written to the client before closing."""
    body = rejection.body
    fields = [
        ("content-type", "text/plain"),
        ("content-length", str(len(body))),
        *_EXTRA.get(rejection, ()),
        ("connection", "close"),
        ("server", "sluice"),
    ]
    return response_head(rejection.status, fields) + body


class _LogLimit:
    """A fixed window of `LOG_BURST` lines per `LOG_WINDOW_S` (module state: one per process)."""

    window_start = -LOG_WINDOW_S
    written = 0
    suppressed = 0


def count(stats: ProxyStats, rejection: Rejection, peer: str, detail: str = "") -> None:
    """Count a refused request (also as a local reply) and log it. The response is counted by
    whoever writes it (its status class)."""
    reason = rejection.value
    stats.rejections[reason] += 1
    stats.local_replies[reason] += 1
    warn(f"client {peer}: {rejection.status} {reason}" + (f": {detail}" if detail else ""))


def warn(line: str) -> None:
    """One WARN line, unless the window's budget is spent (then counted and said later)."""
    now = time.monotonic()
    limit = _LogLimit
    if now - limit.window_start >= LOG_WINDOW_S:
        limit.window_start = now
        limit.written = 0
    if limit.written >= LOG_BURST:
        limit.suppressed += 1
        return
    limit.written += 1
    if limit.suppressed:
        line += f" ({limit.suppressed} similar lines suppressed)"
        limit.suppressed = 0
    log.warning("%s", line)
