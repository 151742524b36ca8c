"""`http.upstream_request`: the upstream request head built from the filters' map, in whatever
order a filter left it (pseudo-headers in front, or one among the fields after
`proxy_set_header_map_pairs`), with the framing fields and `te` read rather than forwarded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sluice.abi import HeaderMap
from sluice.proxy.http import upstream_request

PSEUDO = [(":method", "POST"), (":path", "/a?b"), (":authority", "example"), (":scheme", "http")]


def test_usual_map_forwards_every_field_in_order() -> None:
    headers = HeaderMap([*PSEUDO, ("accept", "*/*"), ("x-request-id", "r1"), ("via", "1.1 sluice")])
    request = upstream_request(headers, end_of_stream=False)
    assert (request.method, request.target) == ("POST", "/a?b")
    assert request.fields == [("host", "example"), ("accept", "*/*"), ("x-request-id", "r1"), ("via", "1.1 sluice")]
    assert request.content_length is None and not request.accepts_trailers


def test_framing_and_te_are_read_not_forwarded() -> None:
    headers = HeaderMap([*PSEUDO, ("content-length", "12"), ("te", "trailers"), ("x-a", "1"), ("expect", "x")])
    request = upstream_request(headers, end_of_stream=False)
    assert request.fields == [("host", "example"), ("x-a", "1")]
    assert request.content_length == 12 and request.accepts_trailers


def test_a_pseudo_header_among_the_fields_is_found_and_not_forwarded() -> None:
    # proxy_set_header_map_pairs keeps the order a filter gave: `:path` after a regular field.
    headers = HeaderMap([])
    headers.replace_all([(":method", "GET"), ("x-a", "1"), (":path", "/moved"), ("1digit", "ok")])
    request = upstream_request(headers, end_of_stream=True, default_authority="fallback")
    assert request.target == "/moved"
    assert request.fields == [("host", "fallback"), ("x-a", "1"), ("1digit", "ok")]


NAMES = st.sampled_from(
    [":method", ":path", ":authority", ":scheme", ":other", "host", "content-length", "te", "expect",
     "transfer-encoding", "accept", "x-a", "1x", "!bang", "via"]
)


@given(st.lists(st.tuples(NAMES, st.sampled_from(["GET", "/p", "7", "trailers", "v"])), max_size=12))
def test_any_order_gives_what_one_careful_pass_gives(pairs: list[tuple[str, str]]) -> None:
    headers = HeaderMap([])
    headers.replace_all(pairs)
    request = upstream_request(headers, end_of_stream=False, default_authority="d")
    # The reference: the first of each pseudo-header, every non-pseudo field not read here, in order.
    first = {name: value for name, value in reversed(pairs)}
    skipped = {"host", "content-length", "transfer-encoding", "expect", "te"}
    assert request.method == (first.get(":method") or "GET")
    assert request.target == (first.get(":path") or "/")
    assert request.fields[0] == ("host", first.get(":authority") or "d")
    assert request.fields[1:] == [(k, v) for k, v in pairs if k[0] != ":" and k not in skipped]
    assert request.accepts_trailers == ("te" in first)
