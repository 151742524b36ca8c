"""sluice/filters/ab.wasm through the abi host alone (tests/hosting.FilterRig)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import hosting
import pytest
from hosting import metric_values, rh

from sluice import BUILTIN_FILTERS_DIR, abi

AB = BUILTIN_FILTERS_DIR / "ab.wasm"
COOKIE_ATTRS = "; Path=/; Max-Age=2592000; HttpOnly"




@pytest.fixture
def rig() -> Iterator[hosting.FilterRig]:
    with hosting.FilterRig() as r:
        yield r


def load(rig: hosting.FilterRig, config: dict[str, Any], **kw: Any) -> Any:
    return rig.load(str(AB), config=config, name="ab", **kw)


def variant_of(ex: Any, header: str = "x-variant") -> str:
    values = ex.request_headers.get_all(header)
    assert len(values) == 1, values
    return str(values[0])


def set_cookies(ex: Any) -> list[str]:
    return [str(v) for v in rh(ex).get_all("set-cookie")]


def test_split_over_10000_keys_is_within_2_points(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"variants": {"stable": 90, "canary": 10}, "key": "header:x-user"})
    counts: Counter[str] = Counter()
    for i in range(10_000):
        ex = rig.request(plugin, headers=[("x-user", f"user-{i}")])
        counts[variant_of(ex)] += 1
        assert set_cookies(ex) == []  # sticky by key: no cookie needed
    assert abs(counts["canary"] / 10_000 - 0.10) <= 0.02, counts
    assert abs(counts["stable"] / 10_000 - 0.90) <= 0.02, counts
    assert metric_values(plugin) == {"ab_variant_stable": counts["stable"], "ab_variant_canary": counts["canary"]}


def test_three_way_split_with_salt_and_zero_weight(rig: hosting.FilterRig) -> None:
    plugin = load(
        rig,
        {"variants": {"a": 50, "b": 30, "c": 20, "off": 0}, "key": "header:x-user", "salt": "exp-7"},
    )
    counts: Counter[str] = Counter()
    for i in range(10_000):
        counts[variant_of(rig.request(plugin, headers=[("x-user", f"u{i}")]))] += 1
    assert counts["off"] == 0
    for name, weight in (("a", 50), ("b", 30), ("c", 20)):
        assert abs(counts[name] / 10_000 - weight / 100) <= 0.02, counts


def test_sticky_per_key_and_salt_changes_assignment(rig: hosting.FilterRig) -> None:
    first = load(rig, {"variants": {"a": 50, "b": 50}, "key": "header:x-user"})
    again = load(rig, {"variants": {"a": 50, "b": 50}, "key": "header:x-user"})
    salted = load(rig, {"variants": {"a": 50, "b": 50}, "key": "header:x-user", "salt": "other"})
    users = [f"user-{i}" for i in range(200)]
    one = [variant_of(rig.request(first, headers=[("x-user", u)])) for u in users]
    assert one == [variant_of(rig.request(first, headers=[("x-user", u)])) for u in users]
    assert one == [variant_of(rig.request(again, headers=[("x-user", u)])) for u in users]
    two = [variant_of(rig.request(salted, headers=[("x-user", u)])) for u in users]
    assert one != two
    assert 40 <= sum(a != b for a, b in zip(one, two, strict=True)) <= 160


def test_cookie_key_and_subject_key(rig: hosting.FilterRig) -> None:
    by_cookie = load(rig, {"variants": {"a": 1, "b": 1}, "key": "cookie:uid"})
    by_header = load(rig, {"variants": {"a": 1, "b": 1}, "key": "header:uid"})
    by_subject = load(rig, {"variants": {"a": 1, "b": 1}, "key": "subject"})
    for i in range(50):
        uid = f"id-{i}"
        expected = variant_of(rig.request(by_header, headers=[("uid", uid)]))
        ex = rig.request(by_cookie, headers=[("cookie", f"theme=dark; uid={uid}; x=1")])
        assert variant_of(ex) == expected
        assert set_cookies(ex) == []
        ex = rig.request(by_subject, headers=[("x-auth-subject", uid)])
        assert variant_of(ex) == expected


def test_random_pick_sets_cookie_and_cookie_is_honoured(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"variants": {"stable": 50, "canary": 50}})
    seen: Counter[str] = Counter()
    for _ in range(400):
        ex = rig.request(plugin)
        variant = variant_of(ex)
        seen[variant] += 1
        assert set_cookies(ex) == [f"sluice_ab={variant}{COOKIE_ATTRS}"]
    assert 120 <= seen["canary"] <= 280, seen  # random, roughly half
    for variant in ("stable", "canary"):
        for _ in range(20):
            ex = rig.request(plugin, headers=[("cookie", f"a=b; sluice_ab={variant}")])
            assert variant_of(ex) == variant
            assert set_cookies(ex) == []


def test_unknown_cookie_variant_and_zero_weight_cookie_are_replaced(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"variants": {"on": 1, "off": 0}, "cookie": "grp"})
    ex = rig.request(plugin, headers=[("cookie", "grp=nonsense")])
    assert variant_of(ex) == "on"
    assert set_cookies(ex) == [f"grp=on{COOKIE_ATTRS}"]
    ex = rig.request(plugin, headers=[("cookie", "grp=off")])
    assert variant_of(ex) == "on"
    ex = rig.request(plugin, headers=[("cookie", "sluice_ab=on")])  # not the configured cookie
    assert set_cookies(ex) == [f"grp=on{COOKIE_ATTRS}"]


def test_key_configured_but_absent_falls_back_to_cookie_then_random(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"variants": {"a": 1, "b": 1}, "key": "header:x-user"})
    ex = rig.request(plugin, headers=[("cookie", "sluice_ab=b")])
    assert variant_of(ex) == "b"
    assert set_cookies(ex) == []
    ex = rig.request(plugin)
    assert set_cookies(ex) == [f"sluice_ab={variant_of(ex)}{COOKIE_ATTRS}"]


def test_client_header_forcing(rig: hosting.FilterRig) -> None:
    plugin = load(
        rig,
        {"variants": {"stable": 100, "canary": 0, "beta": 0}, "header": "X-Group", "allow_force": ["canary"]},
    )
    ex = rig.request(plugin, headers=[("x-group", "canary")])
    assert variant_of(ex, "x-group") == "canary"  # kept as is
    assert set_cookies(ex) == []
    for forced in ("beta", "nope", "stable"):
        ex = rig.request(plugin, headers=[("x-group", forced), ("x-group", "canary")])
        assert variant_of(ex, "x-group") == "stable"
    assert "x-variant" not in ex.request_headers
    assert metric_values(plugin) == {"ab_variant_stable": 3, "ab_variant_canary": 1, "ab_variant_beta": 0}


def test_client_header_overwritten_without_allow_force(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"variants": {"stable": 1, "canary": 0}})
    ex = rig.request(plugin, headers=[("x-variant", "canary")])
    assert variant_of(ex) == "stable"


def test_local_reply_elsewhere_does_not_break_cookie(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"variants": {"only": 1}})
    ex = rig.request(plugin, response_status=503, response_headers=[("set-cookie", "other=1")])
    assert set_cookies(ex) == ["other=1", f"sluice_ab=only{COOKIE_ATTRS}"]


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, "variants is required"),
        ({"variants": {}}, "variants must not be empty"),
        ({"variants": ["a", "b"]}, "variants must be a JSON object"),
        ({"variants": {"a": -1}}, "variants.a must be a non-negative integer"),
        ({"variants": {"a": 1.5}}, "variants.a must be a non-negative integer"),
        ({"variants": {"a": "10"}}, "variants.a must be a non-negative integer"),
        ({"variants": {"a": 0, "b": 0}}, "weights must add up to more than 0"),
        ({"variants": {"a b": 1}}, 'name "a b" may not contain'),
        ({"variants": {"a": 1}, "key": "ip"}, 'unknown key "ip"'),
        ({"variants": {"a": 1}, "allow_force": ["b"]}, 'allow_force: "b" is not a variant'),
        ({"variants": {"a": 1}, "header": ""}, "header must not be empty"),
        ({"variants": {"a": 1}, "cookie": "a;b"}, "cookie: not a valid cookie name"),
        ({"variants": {"a": 1}, "salt": 5}, "salt must be a string"),
        ({"variants": {"a": 1}, "weights": {}}, 'unknown key "weights"'),
    ],
)
def test_bad_config_fails_load(rig: hosting.FilterRig, config: dict[str, Any], problem: str) -> None:
    with pytest.raises(abi.PluginLoadError):
        load(rig, config)
    errors = [
        m for (_, level, m) in rig.logs if level == abi.LogLevel.ERROR and "ab: invalid configuration" in m
    ]
    assert errors, rig.logs
    assert problem in errors[-1]


def test_duplicate_json_key_fails_load(rig: hosting.FilterRig) -> None:
    with pytest.raises(abi.PluginLoadError):
        rig.load(str(AB), config=b'{"variants": {"a": 1, "a": 2}}', name="ab")
    assert any("ab: invalid configuration: not valid JSON (DuplicateField)" in m for (_, _, m) in rig.logs)
