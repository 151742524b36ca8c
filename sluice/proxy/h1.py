"""The HTTP/1.1 wire format both sides share: head serialization and body framing (RFC 9112).

Parsing is httptools (llhttp) on both sides (`downstream.py` for requests, `upstream.py` for
responses); what is written back is built here, so the two sides agree byte for byte on how a head
is spelled, how a chunk is framed and which responses carry no body. Header text is UTF-8 with
surrogate escapes both ways: whatever bytes came in go out unchanged.
"""

from __future__ import annotations

import http
import time
from collections.abc import Iterable

from sluice.abi import HeaderMap

REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in http.HTTPStatus}

LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


def enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


FIELD_NAMES: dict[bytes, str] = {}
"""Field names as llhttp reports them -> decoded and lower-case. The same few dozen names come in
every message, so each is decoded once: a dict lookup per field instead of two calls and two new
strings (whose hashes the set lookups after it then compute again). Bounded: names beyond
`FIELD_NAMES_MAX`, or longer than `FIELD_NAME_KEPT` bytes (a client inventing names), are decoded
each time, never kept: at most ~200 KiB."""
FIELD_NAMES_MAX = 1024
FIELD_NAME_KEPT = 64


def field_name(raw: bytes) -> str:
    """A field name decoded and lower-cased, remembered in `FIELD_NAMES` (which the loops that
    decode heads look into first)."""
    name = raw.decode("utf-8", "surrogateescape").lower()
    if len(raw) <= FIELD_NAME_KEPT and len(FIELD_NAMES) < FIELD_NAMES_MAX:
        FIELD_NAMES[raw] = name
    return name


def decode_fields(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Fields as llhttp reports them, decoded: names lower-case (trailers; a head's fields are
    decoded in the loop that also looks into them)."""
    known = FIELD_NAMES
    return [(known.get(n) or field_name(n), dec(v)) for n, v in raw]


def _field_lines(fields: Iterable[tuple[str, str]]) -> str:
    """`name: value` lines, each ending in CRLF, then the blank line that ends a head.

    `": ".join` over each pair and one `"\r\n".join` run in C: no Python code per field."""
    text = "\r\n".join(map(": ".join, fields))
    return text + "\r\n\r\n" if text else "\r\n"


def request_head(method: str, target: str, fields: Iterable[tuple[str, str]]) -> bytes:
    """`METHOD target HTTP/1.1` and the fields, as written to an upstream."""
    return enc(f"{method} {target} HTTP/1.1\r\n{_field_lines(fields)}")


def response_head(status: int, fields: Iterable[tuple[str, str]]) -> bytes:
    """The status line and the fields, as written to a client."""
    reason = REASONS.get(status, b"Unknown")
    return b"HTTP/1.1 %d %s\r\n" % (status, reason) + enc(_field_lines(fields))


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: an empty chunk ends the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: HeaderMap | None) -> bytes:
    """The end of a chunked body, with trailer fields when there are any."""
    if not trailers:
        return LAST_CHUNK
    return b"0\r\n" + enc(_field_lines([(k, v) for k, v in trailers if k[0] != ":"]))


def response_has_body(status: int, method: str) -> bool:
    """Whether a response may carry a body at all (RFC 9112 section 6.3, rules 1-2)."""
    return not (method == "HEAD" or status in (204, 304) or 100 <= status < 200)


class HttpDate:
    """The `Date` field value, formatted once per second (every response carries one)."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second))
        return self._value
