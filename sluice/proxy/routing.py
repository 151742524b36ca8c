"""Route selection: which cluster a request goes to.

Routes are tried in config order and the first match wins. The request is matched as the chain's
request-headers phase left it, so a filter that rewrites `:path` or adds a header (an A/B filter
setting `x-variant`) steers routing. This runs once per request: everything that can be worked
out from the config is done in `Router.__init__`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sluice import abi
from sluice.proxy.config import RouteConfig

__all__ = ["Router"]


class _Entry:
    """One route, reduced to what `match` tests, cheapest test first."""

    __slots__ = ("exact", "headers", "methods", "pattern", "prefix", "route")

    def __init__(self, route: RouteConfig) -> None:
        m = route.match
        self.route = route
        # Exactly one of these three is set; no path condition at all means prefix "/".
        self.exact: str | None = m.path
        self.pattern: re.Pattern[str] | None = re.compile(m.regex) if m.regex is not None else None
        self.prefix: str = m.prefix if m.prefix is not None else "/"
        self.methods: frozenset[str] | None = frozenset(m.methods) or None
        self.headers: tuple[tuple[str, str], ...] | None = tuple(m.headers.items()) or None


class Router:
    """First-match-wins route table over prefix / exact path / regex, headers and methods."""

    __slots__ = ("_entries", "_routes")

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self._routes = tuple(routes)
        self._entries = tuple(_Entry(route) for route in routes)

    @property
    def routes(self) -> tuple[RouteConfig, ...]:
        return self._routes

    def match(self, method: str, path: str, headers: abi.HeaderMap) -> RouteConfig | None:
        """The first route matching the request, or None (the proxy answers 404).

        `path` is the request path without the query string; one that still has it is cut at '?'.
        A header condition holds when any value of that header equals the configured value.
        """
        query = path.find("?")
        if query >= 0:
            path = path[:query]
        method = method.upper()
        # Header conditions are rare and usually on the first routes; index the request's
        # headers once, and only if some route gets as far as checking them.
        index: dict[str, list[str]] | None = None
        for entry in self._entries:
            if entry.exact is not None:
                if path != entry.exact:
                    continue
            elif entry.pattern is not None:
                if entry.pattern.fullmatch(path) is None:
                    continue
            elif not path.startswith(entry.prefix):
                continue
            if entry.methods is not None and method not in entry.methods:
                continue
            if entry.headers is not None:
                if index is None:
                    index = {}
                    for name, value in headers:
                        index.setdefault(name, []).append(value)
                if not all(value in index.get(name, ()) for name, value in entry.headers):
                    continue
            return entry.route
        return None

    def match_request(self, headers: abi.HeaderMap) -> RouteConfig | None:
        """`match` with method and path taken from the `:method` and `:path` pseudo-headers."""
        return self.match(headers.get(":method") or "GET", headers.get(":path") or "/", headers)
