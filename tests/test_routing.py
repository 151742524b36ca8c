from __future__ import annotations

from typing import Any

import pytest

from sluice.abi import HeaderMap
from sluice.proxy.config import RouteConfig, RouteMatch, parse_config
from sluice.proxy.routing import Router


def route(cluster: str, **match: Any) -> RouteConfig:
    return RouteConfig(match=RouteMatch(**match), cluster=cluster, name=cluster)


def pick(router: Router, method: str, path: str, headers: HeaderMap | None = None) -> str | None:
    found = router.match(method, path, headers if headers is not None else HeaderMap())
    return found.cluster if found is not None else None


def test_prefix() -> None:
    router = Router([route("api", prefix="/api/"), route("root", prefix="/")])
    assert pick(router, "GET", "/api/users") == "api"
    assert pick(router, "GET", "/api/") == "api"
    assert pick(router, "GET", "/api") == "root"  # a prefix is a string prefix, "/api/" needs the slash
    assert pick(router, "GET", "/apix") == "root"


def test_no_path_condition_means_prefix_slash() -> None:
    router = Router([route("any")])
    assert pick(router, "DELETE", "/") == "any"
    assert pick(router, "GET", "/deep/path") == "any"


def test_exact_path() -> None:
    router = Router([route("health", path="/healthz")])
    assert pick(router, "GET", "/healthz") == "health"
    assert pick(router, "GET", "/healthz/") is None
    assert pick(router, "GET", "/healthzz") is None


def test_regex_is_a_full_match() -> None:
    router = Router([route("user", regex=r"/users/\d+"), route("rest", prefix="/")])
    assert pick(router, "GET", "/users/42") == "user"
    assert pick(router, "GET", "/users/42/posts") == "rest"
    assert pick(router, "GET", "/v1/users/42") == "rest"


def test_query_string_is_not_part_of_the_path() -> None:
    router = Router([route("exact", path="/search"), route("re", regex="/items/[a-z]+")])
    assert pick(router, "GET", "/search?q=x") == "exact"
    assert pick(router, "GET", "/items/abc?page=2") == "re"


def test_methods() -> None:
    router = Router([route("writes", prefix="/", methods=["post", "PUT"]), route("reads", prefix="/")])
    assert pick(router, "POST", "/x") == "writes"
    assert pick(router, "PUT", "/x") == "writes"
    assert pick(router, "GET", "/x") == "reads"
    assert pick(router, "post", "/x") == "writes"


def test_headers_exact_and_case_insensitive_names() -> None:
    router = Router([route("canary", headers={"X-Variant": "canary"}), route("web")])
    assert pick(router, "GET", "/", HeaderMap([("x-variant", "canary")])) == "canary"
    assert pick(router, "GET", "/", HeaderMap([("X-VARIANT", "canary")])) == "canary"
    assert pick(router, "GET", "/", HeaderMap([("x-variant", "Canary")])) == "web"  # values are exact
    assert pick(router, "GET", "/", HeaderMap([("x-variant", "canary-2")])) == "web"
    assert pick(router, "GET", "/", HeaderMap()) == "web"


def test_every_header_must_match_and_any_value_counts() -> None:
    router = Router([route("both", headers={"a": "1", "b": "2"}), route("web")])
    assert pick(router, "GET", "/", HeaderMap([("a", "1"), ("b", "2")])) == "both"
    assert pick(router, "GET", "/", HeaderMap([("a", "1")])) == "web"
    assert pick(router, "GET", "/", HeaderMap([("a", "0"), ("a", "1"), ("b", "2")])) == "both"


def test_pseudo_header_authority() -> None:
    router = Router([route("api-host", headers={":authority": "api.example.com"}), route("web")])
    headers = HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "api.example.com")])
    assert pick(router, "GET", "/", headers) == "api-host"


def test_all_conditions_combine() -> None:
    router = Router(
        [route("special", prefix="/admin", methods=["POST"], headers={"x-role": "ops"}), route("web")]
    )
    ops = HeaderMap([("x-role", "ops")])
    assert pick(router, "POST", "/admin/reload", ops) == "special"
    assert pick(router, "GET", "/admin/reload", ops) == "web"
    assert pick(router, "POST", "/other", ops) == "web"
    assert pick(router, "POST", "/admin/reload", HeaderMap()) == "web"


def test_first_match_wins() -> None:
    router = Router([route("first", prefix="/"), route("second", path="/exact")])
    assert pick(router, "GET", "/exact") == "first"
    both = Router([route("a", prefix="/x"), route("b", prefix="/x")])
    assert pick(both, "GET", "/x") == "a"


def test_no_match_is_none() -> None:
    router = Router([route("api", prefix="/api")])
    assert pick(router, "GET", "/other") is None
    assert Router([]).match("GET", "/", HeaderMap()) is None


def test_match_sees_headers_as_the_filters_left_them() -> None:
    # The chain's request-headers phase runs first; routing reads the same (mutated) HeaderMap.
    router = Router([route("web-canary", headers={"x-variant": "canary"}), route("web")])
    headers = HeaderMap([(":method", "GET"), (":path", "/"), ("x-variant", "canary")])
    assert pick(router, "GET", "/", headers) == "web-canary"
    headers.set("x-variant", "stable")  # e.g. an A/B filter overriding a client-supplied value
    assert pick(router, "GET", "/", headers) == "web"
    headers.remove("x-variant")
    assert pick(router, "GET", "/", headers) == "web"
    headers.add("x-variant", "canary")
    assert pick(router, "GET", "/", headers) == "web-canary"


def test_match_request_reads_pseudo_headers() -> None:
    router = Router([route("post-api", prefix="/api", methods=["POST"]), route("web")])
    headers = HeaderMap([(":method", "POST"), (":path", "/api/x?y=1")])
    found = router.match_request(headers)
    assert found is not None and found.cluster == "post-api"
    headers.set(":path", "/rewritten")  # a filter rewriting the path changes the route
    found = router.match_request(headers)
    assert found is not None and found.cluster == "web"


def test_router_from_config() -> None:
    config = parse_config(
        """\
listen: 127.0.0.1:8080
clusters:
  web: {endpoints: ["127.0.0.1:9001"]}
  web-canary: {endpoints: ["127.0.0.1:9003"]}
routes:
  - match: {prefix: /, headers: {x-variant: canary}}
    cluster: web-canary
  - match: {prefix: /}
    cluster: web
"""
    )
    router = Router(config.routes)
    assert router.routes == tuple(config.routes)
    canary = router.match("GET", "/", HeaderMap([("x-variant", "canary")]))
    assert canary is config.routes[0] and canary.name == "route0"
    assert router.match("GET", "/", HeaderMap()) is config.routes[1]


@pytest.mark.parametrize("path", ["/", "/a", "/a/b/c"])
def test_routes_are_not_mutated(path: str) -> None:
    routes = [route("x", regex="/a.*"), route("y")]
    Router(routes).match("GET", path, HeaderMap())
    assert routes[0].match.regex == "/a.*" and routes[1].match.prefix is None
