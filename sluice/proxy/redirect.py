"""A plain listener that sends every request to https (a listener's `redirect:` block).

Each request is answered at once with a redirect to `https://host[:port]/path?query`: the host
of the request (its `Host`, or the authority of an absolute-form target) without its port, the
listener's `https_port` unless it is 443, and the target as it came. No filter runs and no
upstream is asked; the answers count as local replies (`https_redirect`) and as 3xx responses.
A request without a usable host gets 400 and counts as a rejection (`bad_request`).

The default status is 308 (Permanent Redirect), not the 301 nginx configs usually use: a 301
lets a client resend a POST as a GET without its body (RFC 9110 15.4.2), a 308 keeps the method
and body. 301 (or 302/307) is available for clients that predate 308.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sluice.abi import HeaderMap

from . import rejections
from .h1 import HttpDate, response_head
from .http import origin_form
from .rejections import Rejection
from .stats import ProxyStats, status_class

if TYPE_CHECKING:
    from .downstream import ClientLimits, DownstreamConnection, RequestHead, ServedConnection

REDIRECT_STATUSES = (301, 302, 307, 308)

# RFC 3986 reg-name (no percent-encoding: hosts are names or addresses) or an IP literal.
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=]+")
_IP_LITERAL = re.compile(r"\[[0-9A-Fa-f:.]+\]")


@dataclass(frozen=True, slots=True)
class HttpsRedirect:
    """A listener's `redirect:` block, resolved."""

    https_port: int = 443
    status: int = 308

    def location(self, target: str, host_field: str | None) -> str | None:
        """Where a request for `target` with `Host: host_field` is sent; None: no usable host."""
        path, authority = origin_form(target)
        host = host_without_port(authority if authority else (host_field or ""))
        if host is None:
            return None
        if path == "*":
            path = "/"
        port = "" if self.https_port == 443 else f":{self.https_port}"
        return f"https://{host}{port}{path}"


def host_without_port(authority: str) -> str | None:
    """`example.com:80` -> `example.com`, `[::1]:80` -> `[::1]`; None when it is not a host."""
    authority = authority.strip()
    if authority.startswith("["):
        end = authority.find("]")
        host, rest = authority[: end + 1], authority[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())) or not _IP_LITERAL.fullmatch(host):
            return None
        return host.lower()
    host, sep, port = authority.partition(":")
    if (sep and not port.isdigit()) or not _REG_NAME.fullmatch(host):
        return None
    return host.lower()


class RedirectOwner(Protocol):
    """What a redirect listener uses of the proxy server (`server.ProxyServer`)."""

    stats: ProxyStats
    connections: set[ServedConnection]
    date: HttpDate

    def limits(self) -> ClientLimits: ...

    def connection_closed(self, client: ServedConnection) -> None: ...


class RedirectListener:
    """The `ConnectionOwner` of a redirect listener's connections: the proxy's counters, limits
    and connection set (so drain and shutdown cover them), and a redirect for every request."""

    def __init__(self, server: RedirectOwner, redirect: HttpsRedirect) -> None:
        self._server = server
        self.redirect = redirect
        self.stats = server.stats
        self.connections = server.connections
        self.date = server.date

    def limits(self) -> ClientLimits:
        return self._server.limits()

    def begin(self, client: DownstreamConnection, head: RequestHead) -> RedirectReply:
        return RedirectReply(self, client, head)

    def connection_closed(self, client: ServedConnection) -> None:
        self._server.connection_closed(client)


class RedirectReply:
    """The `RequestHandler` of one request on a redirect listener: answered in `start`."""

    __slots__ = ("_listener", "_client", "_head")

    def __init__(self, listener: RedirectListener, client: DownstreamConnection, head: RequestHead) -> None:
        self._listener = listener
        self._client = client
        self._head = head

    def start(self, body: bytes, complete: bool, trailers: HeaderMap | None) -> None:
        head = self._head
        client = self._client
        listener = self._listener
        stats = listener.stats
        host = next((value for name, value in head.fields if name == "host"), None)
        location = listener.redirect.location(head.target, host)
        if location is None:
            rejections.count(stats, Rejection.BAD_REQUEST, client.peer, "no host to redirect to")
            stats.responses[status_class(Rejection.BAD_REQUEST.status)] += 1
            client.write(rejections.reply_bytes(Rejection.BAD_REQUEST))
            client.exchange_done(self, False)
            return
        status = listener.redirect.status
        keep_alive = head.keep_alive and not client.closing
        fields = [
            ("location", location),
            ("content-length", "0"),
            ("server", "sluice"),
            ("date", listener.date.now()),
        ]
        if not keep_alive:
            fields.append(("connection", "close"))
        stats.local_replies["https_redirect"] += 1
        stats.responses[status_class(status)] += 1
        client.write(response_head(status, fields))
        client.exchange_done(self, keep_alive)

    def request_body(self, body: bytes, complete: bool, trailers: HeaderMap | None) -> None:
        pass  # answered already; the connection discards the rest

    def client_writable(self) -> None:
        pass

    def client_gone(self) -> None:
        pass

    def client_error(self, reason: str) -> None:
        pass

    def client_timeout(self, rejection: Rejection) -> None:
        pass
