"""`HeaderMap` against a plain list model: every operation, in any order, gives the same entries
and the same answers (its name index must never go stale), and the pairs wire format round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.abi import HeaderMap, fastcall
from sluice.abi.fastcall import serialize_pairs
from sluice.abi.headers import deserialize_pairs

NAMES = st.sampled_from([":method", ":path", ":status", "host", "x-a", "X-A", "x-b", "via", "é-x"])
VALUES = st.text(max_size=5)
OPS = st.one_of(
    st.tuples(st.just("add"), NAMES, VALUES),
    st.tuples(st.just("set"), NAMES, VALUES),
    st.tuples(st.just("remove"), NAMES, st.just("")),
    st.tuples(st.just("get"), NAMES, st.just("")),
    st.tuples(st.just("get_all"), NAMES, st.just("")),
    st.tuples(st.just("contains"), NAMES, st.just("")),
    st.tuples(st.just("replace_all"), NAMES, VALUES),
)


def model_add(model: list[tuple[str, str]], name: str, value: str) -> None:
    if name.startswith(":"):
        at = 0
        while at < len(model) and model[at][0].startswith(":"):
            at += 1
        model.insert(at, (name, value))
    else:
        model.append((name, value))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=6), st.lists(OPS, max_size=25))
def test_header_map_matches_a_list_model(start: list[tuple[str, str]], ops: list[tuple[str, str, str]]) -> None:
    headers = HeaderMap(start)
    model = [(k.lower(), v) for k, v in start]
    for op, raw_name, value in ops:
        name = raw_name.lower()
        if op == "add":
            headers.add(raw_name, value)
            model_add(model, name, value)
        elif op == "set":
            headers.set(raw_name, value)
            at = next((i for i, (k, _) in enumerate(model) if k == name), None)
            if at is None:
                model_add(model, name, value)
            else:
                model[at] = (name, value)
                model[at + 1 :] = [kv for kv in model[at + 1 :] if kv[0] != name]
        elif op == "remove":
            headers.remove(raw_name)
            model = [kv for kv in model if kv[0] != name]
        elif op == "replace_all":
            headers.replace_all([(raw_name, value), ("x-z", value)])
            model = [(name, value), ("x-z", value)]
        elif op == "get":
            want = next((v for k, v in model if k == name), None)
            # The compiled lookup of proxy_get_header_map_value answers the same (and may make the
            # name index the next operations use).
            assert fastcall.header_get(headers, raw_name) == want
            assert headers.get(raw_name) == want
        elif op == "get_all":
            assert headers.get_all(raw_name) == [v for k, v in model if k == name]
        else:
            assert (raw_name in headers) == any(k == name for k, _ in model)
        assert headers.items() == model
        assert headers.byte_size() == sum(len(k.encode()) + len(v.encode()) for k, v in model)


@given(st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4)), max_size=5))
def test_pairs_round_trip(pairs: list[tuple[str, str]]) -> None:
    clean = [(k.replace("\0", ""), v.replace("\0", "")) for k, v in pairs]
    assert deserialize_pairs(serialize_pairs(clean)) == clean
    as_bytes = [(k.encode(), v.encode()) for k, v in clean]
    assert serialize_pairs(as_bytes) == serialize_pairs(clean)


def test_pairs_wire_layout() -> None:
    """The bytes proxy_get_header_map_pairs hands a filter: count, the lengths, then each text and
    its NUL; a byte that is not UTF-8 (kept as a surrogate escape) goes back out as that byte."""
    data = serialize_pairs([(":path", "/é"), ("x-raw", "\udcff")])
    assert data == (
        (2).to_bytes(4, "little") + b"".join(n.to_bytes(4, "little") for n in (5, 3, 5, 1))
        + b":path\0/\xc3\xa9\0x-raw\0\xff\0"
    )
    assert deserialize_pairs(data) == [(":path", "/é"), ("x-raw", "\udcff")]
    assert serialize_pairs([]) == b""
    # Bytes-like parts are their bytes; anything else is refused, never read as text.
    assert serialize_pairs([(bytearray(b"k"), memoryview(b"v"))]) == serialize_pairs([("k", "v")])
    with pytest.raises(TypeError):
        serialize_pairs([(1, b"")])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=6), st.lists(st.tuples(st.booleans(), NAMES, VALUES), max_size=12),
       st.integers(0, 8), st.integers(0, 60))
def test_bounded_writes_match_the_unbounded_ones_within_their_bounds(
    start: list[tuple[str, str]], ops: list[tuple[bool, str, str]], max_entries: int, max_bytes: int
) -> None:
    """The compiled add and replace of the header host calls (`fastcall.header_add_within`,
    `header_set_within`) write exactly what add / set write when the result fits the bounds
    (entries, then bytes of names and values), and nothing otherwise; the size they keep is exact."""
    headers = HeaderMap(start)
    for replace, raw_name, value in ops:
        name = raw_name.lower()
        expected = headers.copy()
        before = list(expected)
        if replace:
            grows = name not in expected
            expected.set(name, value)
            fit = fastcall.header_set_within(headers, name, value, max_entries, max_bytes)
        else:
            grows = True
            expected.add(raw_name, value)
            fit = fastcall.header_add_within(headers, raw_name, value, max_entries, max_bytes)
        want = fastcall.HEADER_FITS
        if grows and len(before) >= max_entries:
            want = fastcall.HEADER_TOO_MANY
        elif expected.byte_size() > max_bytes:
            want = fastcall.HEADER_TOO_LARGE
        assert fit == want
        assert list(headers) == (list(expected) if want == fastcall.HEADER_FITS else before)
        assert headers.byte_size() == HeaderMap(list(headers)).byte_size()
