"""HTTP/1.1 proxy duties that do not depend on any I/O library (RFC 9110 section 7).

Everything here works on `abi.HeaderMap`, the header representation the filters see, so the
server and the upstream client agree on one shape: lower-case names, pseudo-headers in front.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from sluice.abi import HeaderMap

VIA = "1.1 sluice"

# RFC 9110 7.6.1 plus the legacy ones every proxy strips (RFC 2068 Keep-Alive, Proxy-Connection).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

# Methods whose requests mean to carry content: without a body they still say `content-length: 0`
# (RFC 9110 8.6), which some upstreams require.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# Request fields the upstream request does not copy from the filters' map (the usual pseudo-headers
# too, so that one set lookup skips them; any other `:name` is skipped after it): `host` is rebuilt from
# `:authority`, the framing is the upstream connection's own, `expect` was answered here, and
# `te: trailers` (kept for filters and HTTP/2 upstreams, where gRPC needs it) is hop-by-hop here.
_NOT_FORWARDED = frozenset(
    {"host", "content-length", "transfer-encoding", "expect", "te", ":method", ":path", ":authority", ":scheme"}
)


_DROPPED_REQUEST_FIELDS = (HOP_BY_HOP - {"te"}) | {"host", "x-forwarded-for", "via"}
"""Client fields the filters' map does not copy: hop-by-hop ones (`te: trailers` aside), `host`
(it becomes `:authority`), and the two the proxy appends to (`x-forwarded-for`, `via`)."""

_NOTED_REQUEST_FIELDS = _DROPPED_REQUEST_FIELDS | {"te", "x-request-id", "x-forwarded-proto", "x-forwarded-host"}
"""Client fields `downstream_request_headers` looks into."""


_PLAIN_CONNECTION = frozenset({"keep-alive", "close"})
"""`Connection` values that name no other field (most messages that have one say one of them)."""


def connection_tokens(values: list[str]) -> set[str]:
    """Header names listed in `Connection` values (each is hop-by-hop for this hop only)."""
    if len(values) == 1:
        only = values[0].lower()
        if only in _PLAIN_CONNECTION:
            return {only}  # nothing to split
    tokens = {t.strip().lower() for value in values for t in value.split(",")}
    tokens.discard("")
    return tokens


def drop_connection_tokens(fields: list[tuple[str, str]], tokens: set[str]) -> list[tuple[str, str]]:
    """`fields` without those `Connection` named (`HOP_BY_HOP` ones are gone already)."""
    if tokens - HOP_BY_HOP:
        return [(k, v) for k, v in fields if k not in tokens]
    return fields


class RequestIds:
    """UUID-shaped request ids: a random per-process prefix and a counter.

    Unique within the process and unpredictable across processes, at a fraction of uuid4's cost
    (no syscall, no UUID object): this runs for every request without an x-request-id.
    """

    def __init__(self) -> None:
        raw = os.urandom(10).hex()
        self._prefix = f"{raw[:8]}-{raw[8:12]}-4{raw[12:15]}-{'89ab'[int(raw[15], 16) & 3]}{raw[16:19]}-"
        self._next = int.from_bytes(os.urandom(4), "big")

    def next(self) -> str:
        self._next = (self._next + 1) & 0xFFFFFFFFFFFF
        return f"{self._prefix}{self._next:012x}"


def origin_form(target: str) -> tuple[str, str | None]:
    """The path (with query) of a request target and, for the absolute form, its authority.

    RFC 9112 3.2.2: a server accepts `http://host/path` and then takes the host from the target,
    not from the `Host` field. Origin-form (`/path`) and `*` come back as they are.
    """
    if target[:1] == "/" or target == "*":
        return target, None
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return target, None
    cut = len(rest)
    for mark in "/?#":
        at = rest.find(mark)
        if 0 <= at < cut:
            cut = at
    authority = rest[:cut].rpartition("@")[2]  # userinfo is not part of the host (RFC 9110 4.2.4)
    path = rest[cut:].partition("#")[0]
    if not path or path[0] != "/":
        path = "/" + path
    return path, authority


def downstream_request_headers(
    method: str,
    path: str,
    fields: list[tuple[str, str]],
    client_ip: str,
    scheme: str,
    request_ids: RequestIds | None,
    target_authority: str | None = None,
) -> tuple[HeaderMap, str | None]:
    """The request headers the filters see, built in one pass from what the client sent (field
    names lower-case, as both downstream codecs give them).

    `Host` becomes `:authority` (as in Envoy; `target_authority`, from an absolute-form target,
    takes its place), hop-by-hop headers are dropped, x-request-id is added when absent,
    X-Forwarded-For/-Proto/-Host and Via are added. Returns the map and the protocol named by
    `Upgrade` when the request asks for one (WebSocket), else None.
    """
    authority = ""
    regular: list[tuple[str, str]] = []
    connection: list[str] = []
    upgrade: str | None = None
    xff: list[str] = []
    via: list[str] = []
    has_id = has_proto = has_host = has_te = False
    # One loop: most fields are copied as they are (the same tuples) after one set lookup; the
    # few it picks out get a second look. (A comprehension for the copy costs more than it saves
    # on a handful of fields: in CPython 3.11 each one is a function call.)
    for kv in fields:
        name = kv[0]
        if name not in _NOTED_REQUEST_FIELDS:
            regular.append(kv)
            continue
        if name not in _DROPPED_REQUEST_FIELDS:
            regular.append(kv)  # looked into, and kept
        value = kv[1]
        if name == "host":
            authority = value
        elif name == "x-forwarded-for":
            xff.append(value)
        elif name == "via":
            via.append(value)
        elif name == "connection":
            connection.append(value)
        elif name == "upgrade":
            upgrade = value
        elif name == "te":
            has_te = True
        elif name == "x-request-id":
            has_id = True
        elif name == "x-forwarded-proto":
            has_proto = True
        elif name == "x-forwarded-host":
            has_host = True
    if has_te:
        # Only "the client accepts trailers" is kept: filters see it as in Envoy, and an HTTP/2
        # upstream gets it (gRPC needs it; the one TE value HTTP/2 allows).
        regular = [
            (k, "trailers") if k == "te" else (k, v)
            for k, v in regular
            if k != "te" or v.strip().lower() == "trailers"
        ]
    tokens: set[str] = set()
    if connection:
        tokens = connection_tokens(connection)
        regular = drop_connection_tokens(regular, tokens)
    if "upgrade" not in tokens:
        upgrade = None
    if target_authority is not None:
        authority = target_authority
    items = [(":method", method), (":path", path), (":authority", authority), (":scheme", scheme)]
    items.extend(regular)
    if not has_id and request_ids is not None:
        items.append(("x-request-id", request_ids.next()))
    xff.append(client_ip)
    items.append(("x-forwarded-for", ", ".join(xff)))
    if not has_proto:
        items.append(("x-forwarded-proto", scheme))
    if not has_host and authority:
        items.append(("x-forwarded-host", authority))
    via.append(VIA)
    items.append(("via", ", ".join(via)))
    return HeaderMap.of_lowercase(items), upgrade


_NOTED_RESPONSE_FIELDS = frozenset({"content-length", "server", "date"})


def copy_response_fields(
    headers: HeaderMap, fields: list[tuple[str, str]], dropped: frozenset[str], drop_length: bool
) -> tuple[bool, bool, bool]:
    """Append to `fields` the response fields a client gets, for either downstream codec: no
    pseudo-headers, none of `dropped` (what the codec frames itself), no Content-Length when
    `drop_length` (the body sent decides it). Returns whether a Content-Length was kept and
    whether Server and Date are there (the codec adds its own otherwise)."""
    has_length = has_server = has_date = False
    for kv in headers:
        name = kv[0]
        if name in _NOTED_RESPONSE_FIELDS:
            if name == "content-length":
                if drop_length:
                    continue
                has_length = True
            elif name == "server":
                has_server = True
            else:
                has_date = True
        elif name in dropped or name[0] == ":":
            continue
        fields.append(kv)  # the map's own tuple
    return has_length, has_server, has_date


def append_value(headers: HeaderMap, name: str, value: str) -> None:
    """Append to a comma-separated list header, keeping one line (what most peers expect)."""
    current = headers.get_all(name)
    if current:
        headers.set(name, ", ".join([*current, value]))
    else:
        headers.add(name, value)


def path_only(path: str) -> str:
    """The path of a request target without its query string (what prefixes match against)."""
    cut = path.find("?")
    return path if cut < 0 else path[:cut]


def local_reply_headers(status: int, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> HeaderMap:
    """Response headers of a generated reply, the way Envoy builds them for a local reply."""
    headers = HeaderMap([(":status", str(status))])
    if body:
        headers.add("content-type", "text/plain")
    headers.add("content-length", str(len(body)))
    for name, value in extra:
        name = name.lower()
        if name in ("content-type", "content-length"):
            headers.set(name, value)
        else:
            headers.add(name, value)
    return headers


class UpstreamRequest(NamedTuple):
    """The head of a request to an upstream, as `UpstreamConnection.start_request` writes it.

    A named tuple rather than a frozen dataclass: one is built per request, and a frozen
    dataclass's `__init__` pays an `object.__setattr__` call per field (five times the cost)."""

    method: str
    target: str
    fields: list[tuple[str, str]]
    """`host` first, then the fields in order; framing fields are added by the connection."""
    has_body: bool
    content_length: int | None
    """Known body length (framed by Content-Length), or None (chunked when there is a body)."""
    retryable: bool
    """Idempotent and complete without a body: may go again on a fresh connection."""
    accepts_trailers: bool = False
    """The client sent `te: trailers` (not in `fields`: an HTTP/2 upstream sends it again)."""


def upstream_request(
    headers: HeaderMap,
    *,
    default_authority: str = "",
    host_rewrite: str | None = None,
    upgrade: str | None = None,
    end_of_stream: bool,
    body_length: int | None = None,
) -> UpstreamRequest:
    """The upstream request for request headers as the filters left them (proxy and callouts).

    `Host` is `host_rewrite`, else `:authority`, else `default_authority`. The body is framed by
    `body_length` when the caller knows it (a callout's whole body), else by the client's
    Content-Length when it gave one, else chunked. A protocol upgrade is asked for again on this
    hop (`Connection`/`Upgrade` are hop-by-hop).
    """
    method = target = authority = None
    fields: list[tuple[str, str]] = [("host", "")]  # its value once `:authority` is known
    content_length: int | None = None
    accepts_trailers = False
    # One pass: the pseudo-headers (the first of each, as `HeaderMap.get` reads them), the framing
    # and the fields to forward.
    for kv in headers:
        name = kv[0]
        if name in _NOT_FORWARDED:
            if name == ":method":
                if method is None:
                    method = kv[1]
            elif name == ":path":
                if target is None:
                    target = kv[1]
            elif name == ":authority":
                if authority is None:
                    authority = kv[1]
            elif name == "content-length":
                if kv[1].isdigit():
                    content_length = int(kv[1])
            elif name == "te":
                accepts_trailers = True  # only `trailers` is let into the map
            continue
        if name[0] != ":":
            fields.append(kv)  # the map's own tuple: nothing is built per field
    method = method or "GET"
    target = target or "/"
    fields[0] = ("host", host_rewrite or authority or default_authority)
    if upgrade is not None:
        fields.append(("connection", "upgrade"))
        fields.append(("upgrade", upgrade))
    if body_length is not None:
        content_length = body_length
    if end_of_stream and method in BODY_METHODS:
        fields.append(("content-length", "0"))
    return UpstreamRequest(
        method,
        target,
        fields,
        not end_of_stream,
        content_length if not end_of_stream else None,
        end_of_stream and method in IDEMPOTENT_METHODS,
        accepts_trailers,
    )
