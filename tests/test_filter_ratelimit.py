"""sluice/filters/ratelimit.wasm through the abi host alone (tests/hosting.FilterRig)."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from typing import Any

import hosting
import pytest
from hosting import metric_values, rh

from sluice import BUILTIN_FILTERS_DIR, abi

RATELIMIT = BUILTIN_FILTERS_DIR / "ratelimit.wasm"
SLOW = 0.001  # requests per second: no measurable refill during a test
UNIT = 1_000_000_000




@pytest.fixture
def rig() -> Iterator[hosting.FilterRig]:
    with hosting.FilterRig() as r:
        yield r


def load(rig: hosting.FilterRig, config: dict[str, Any], **kw: Any) -> Any:
    kw.setdefault("name", "ratelimit")
    return rig.load(str(RATELIMIT), config=config, **kw)


def denied(ex: Any) -> bool:
    if ex.local_reply is None:
        return False
    assert ex.local_reply.status == 429
    return True


def reply_headers(ex: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in ex.local_reply.headers}


def shared_keys(rig: hosting.FilterRig, vm_id: str = "ratelimit") -> list[bytes]:
    """Bucket keys in the shared data of `vm_id` (the rig's vm_id defaults to the plugin name)."""
    return sorted(rig.shared_data.keys(vm_id, b"rl:"))


def test_burst_is_exact_and_headers(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"requests_per_second": SLOW, "burst": 5})
    remaining = []
    for _ in range(5):
        ex = rig.request(plugin)
        assert not denied(ex)
        assert rh(ex).get("ratelimit-limit") == "5"
        remaining.append(rh(ex).get("ratelimit-remaining"))
        assert int(rh(ex).get("ratelimit-reset") or "-1") >= 0
    assert remaining == ["4", "3", "2", "1", "0"]
    ex = rig.request(plugin)
    assert denied(ex)
    assert ex.local_reply is not None and ex.local_reply.body == b"rate limited"
    h = reply_headers(ex)
    assert h["ratelimit-limit"] == "5"
    assert h["ratelimit-remaining"] == "0"
    # one token takes 1000 s at 0.001 rps
    assert 990 <= int(h["retry-after"]) <= 1000
    assert h["ratelimit-reset"] == h["retry-after"]
    # the local reply is not decorated a second time in the response phase
    assert rh(ex).get_all("ratelimit-limit") == ["5"]
    assert metric_values(plugin) == {"ratelimit_allowed": 5, "ratelimit_denied": 1}


def test_refill_and_retry_after_minimum(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"requests_per_second": 20, "burst": 1})
    assert not denied(rig.request(plugin))
    ex = rig.request(plugin)
    assert denied(ex)
    assert reply_headers(ex)["retry-after"] == "1"  # 50 ms, rounded up to a whole second
    assert reply_headers(ex)["ratelimit-reset"] == "1"
    time.sleep(0.08)
    assert not denied(rig.request(plugin))


def test_default_burst_is_ceil_rate(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"requests_per_second": 2.5})
    results = [denied(rig.request(plugin)) for _ in range(4)]
    assert results == [False, False, False, True]


def test_header_key_and_shared_missing_bucket(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"requests_per_second": SLOW, "burst": 2, "key": "header:X-Api-Key"})
    for key in ("a", "b"):
        assert not denied(rig.request(plugin, headers=[("x-api-key", key)]))
        assert not denied(rig.request(plugin, headers=[("x-api-key", key)]))
        assert denied(rig.request(plugin, headers=[("x-api-key", key)]))
    # requests without the header share the "-" bucket
    assert not denied(rig.request(plugin))
    assert not denied(rig.request(plugin, headers=[("x-other", "1")]))
    assert denied(rig.request(plugin))
    assert shared_keys(rig) == [b"rl:0:-", b"rl:0:a", b"rl:0:b"]


def test_source_key_uses_ip_only(rig: hosting.FilterRig) -> None:
    plugin = load(rig, {"requests_per_second": SLOW, "burst": 2})  # key defaults to source
    assert not denied(rig.request(plugin, source="10.0.0.1:1111"))
    assert not denied(rig.request(plugin, source="10.0.0.1:2222"))
    assert denied(rig.request(plugin, source="10.0.0.1:3333"))
    assert not denied(rig.request(plugin, source="[2001:db8::1]:443"))
    assert not denied(rig.request(plugin, source="10.0.0.2:1111"))
    assert shared_keys(rig) == [b"rl:0:10.0.0.1", b"rl:0:10.0.0.2", b"rl:0:2001:db8::1"]


def test_subject_keys(rig: hosting.FilterRig) -> None:
    plugin = load(
        rig,
        {
            "rules": [
                {"name": "subj", "requests_per_second": SLOW, "burst": 1, "key": "subject"},
                {"name": "team", "requests_per_second": SLOW, "burst": 10, "key": "subject:X-Team"},
            ]
        },
    )
    assert not denied(rig.request(plugin, headers=[("x-auth-subject", "alice"), ("x-team", "red")]))
    assert denied(rig.request(plugin, headers=[("x-auth-subject", "alice"), ("x-team", "red")]))
    assert not denied(rig.request(plugin, headers=[("x-auth-subject", "bob"), ("x-team", "red")]))
    assert b"rl:subj:alice" in shared_keys(rig)
    assert b"rl:team:red" in shared_keys(rig)


def test_rules_most_restrictive_headers(rig: hosting.FilterRig) -> None:
    plugin = load(
        rig,
        {
            "rules": [
                {"name": "global", "requests_per_second": SLOW, "burst": 4, "key": "header:x-none"},
                {"requests_per_second": SLOW, "burst": 3, "key": "header:x-user"},
            ],
            "cleanup_interval_s": 10,
            "idle_timeout_s": 60,
        },
    )

    def limits(user: str) -> tuple[str | None, str | None]:
        ex = rig.request(plugin, headers=[("x-user", user)])
        assert not denied(ex)
        return rh(ex).get("ratelimit-limit"), rh(ex).get("ratelimit-remaining")

    assert limits("u") == ("3", "2")  # global 3 left, u 2 left
    limits("v")  # global 2 left, v 2 left
    assert limits("w") == ("4", "1")  # global 1 left, w 2 left
    assert limits("x") == ("4", "0")
    ex = rig.request(plugin, headers=[("x-user", "y")])
    assert denied(ex)
    assert reply_headers(ex)["ratelimit-limit"] == "4"
    # rule 1 has no name: its index names the bucket; a missing header is the "-" bucket
    assert shared_keys(rig) == [b"rl:1:u", b"rl:1:v", b"rl:1:w", b"rl:1:x", b"rl:global:-"]


def test_request_denied_by_a_later_rule_costs_no_token_in_earlier_rules(rig: hosting.FilterRig) -> None:
    plugin = load(
        rig,
        {
            "rules": [
                {"name": "tenant", "requests_per_second": SLOW, "burst": 3, "key": "header:x-tenant"},
                {"name": "user", "requests_per_second": SLOW, "burst": 1, "key": "header:x-user"},
            ]
        },
    )
    assert not denied(rig.request(plugin, headers=[("x-tenant", "t"), ("x-user", "u1")]))
    for _ in range(5):  # u1 is out of tokens: the tenant bucket must not be drained by these
        assert denied(rig.request(plugin, headers=[("x-tenant", "t"), ("x-user", "u1")]))
    assert not denied(rig.request(plugin, headers=[("x-tenant", "t"), ("x-user", "u2")]))
    assert not denied(rig.request(plugin, headers=[("x-tenant", "t"), ("x-user", "u3")]))
    ex = rig.request(plugin, headers=[("x-tenant", "t"), ("x-user", "u4")])
    assert denied(ex)
    assert reply_headers(ex)["ratelimit-limit"] == "3"


def test_two_plugins_sharing_vm_id_share_buckets(rig: hosting.FilterRig) -> None:
    config = {"requests_per_second": SLOW, "burst": 25, "key": "header:x-k"}
    p1 = load(rig, config, name="rl-a", vm_id="edge")
    p2 = load(rig, config, name="rl-b", vm_id="edge")
    other = load(rig, config, name="rl-c", vm_id="other")
    allowed = 0
    for i in range(60):
        ex = rig.request(p1 if i % 2 else p2, headers=[("x-k", "same")])
        allowed += not denied(ex)
    assert allowed == 25
    m1, m2 = metric_values(p1), metric_values(p2)
    assert m1["ratelimit_allowed"] + m2["ratelimit_allowed"] == 25
    assert m1["ratelimit_denied"] + m2["ratelimit_denied"] == 35
    # a different vm_id is a different namespace
    assert not denied(rig.request(other, headers=[("x-k", "same")]))


class RacingSharedData:
    """Wraps the host's shared data: after every `race_every`-th get of a bucket, a "concurrent
    VM" takes a token from it, so the filter's following set(cas) fails with CAS_MISMATCH."""

    def __init__(self, inner: Any, race_every: int) -> None:
        self.inner = inner
        self.race_every = race_every
        self.gets = 0
        self.stolen = 0
        self.mismatches = 0

    def get(self, vm_id: str, key: bytes) -> Any:
        got = self.inner.get(vm_id, key)
        self.gets += 1
        if got is not None and key.startswith(b"rl:") and self.gets % self.race_every == 0:
            value, cas = got
            tokens, last = struct.unpack("<QQ", value)
            if tokens >= UNIT:
                assert self.inner.set(vm_id, key, struct.pack("<QQ", tokens - UNIT, last), cas) == 0
                self.stolen += 1
        return got

    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> Any:
        status = self.inner.set(vm_id, key, value, cas)
        if status == abi.types.WasmResult.CAS_MISMATCH:
            self.mismatches += 1
        return status

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_cas_retry_keeps_limit_exact_under_concurrent_updates(
    rig: hosting.FilterRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another VM updating the bucket between our get and set(cas) must not break exactness."""
    racing = RacingSharedData(rig.shared_data, race_every=3)
    monkeypatch.setattr(rig.runtime, "shared_data", racing)
    p1 = load(rig, {"requests_per_second": SLOW, "burst": 40, "key": "header:x-k"}, name="a", vm_id="v")
    p2 = load(rig, {"requests_per_second": SLOW, "burst": 40, "key": "header:x-k"}, name="b", vm_id="v")
    allowed = sum(not denied(rig.request(p1 if i % 2 else p2, headers=[("x-k", "k")])) for i in range(80))
    assert racing.mismatches > 0
    assert allowed + racing.stolen == 40


class Recorder:
    """`abi.StreamCallbacks` that records the local reply of one stream."""

    def __init__(self) -> None:
        self.reply: abi.LocalReply | None = None

    def continue_request(self) -> None:
        pass

    def continue_response(self) -> None:
        pass

    def send_local_reply(self, reply: abi.LocalReply) -> None:
        self.reply = reply

    def reset(self) -> None:
        pass


def test_many_concurrent_streams(rig: hosting.FilterRig) -> None:
    """100 streams open at once on 2 plugins sharing a vm_id: exactly `burst` get through."""
    p1 = load(rig, {"requests_per_second": SLOW, "burst": 30}, name="a", vm_id="burst")
    p2 = load(rig, {"requests_per_second": SLOW, "burst": 30}, name="b", vm_id="burst")
    opened = []
    for i in range(100):
        events = Recorder()
        info = abi.StreamInfo(source_address=f"192.0.2.7:{1000 + i}")
        stream = (p1 if i % 2 else p2).new_stream(info, events)
        opened.append((stream, events))
    statuses = []
    for stream, _ in opened:  # every request phase runs before any stream completes
        headers = abi.HeaderMap([(":method", "GET"), (":path", "/"), (":authority", "x")])
        statuses.append(stream.request_headers(headers, True))
    allowed = [events for _, events in opened if events.reply is None]
    assert len(allowed) == 30
    assert statuses.count(abi.FilterStatus.CONTINUE) == 30
    assert all(e.reply.status == 429 for _, e in opened if e.reply is not None)
    for stream, events in reversed(opened):
        if events.reply is None:
            response = abi.HeaderMap([(":status", "200")])
            stream.response_headers(response, True)
            assert response.get("ratelimit-limit") == "30"
        stream.complete()
    assert metric_values(p1)["ratelimit_denied"] + metric_values(p2)["ratelimit_denied"] == 70
    assert metric_values(p1)["ratelimit_allowed"] + metric_values(p2)["ratelimit_allowed"] == 30
    assert shared_keys(rig, "burst") == [b"rl:0:192.0.2.7"]


def test_idle_buckets_are_cleaned_up(rig: hosting.FilterRig) -> None:
    plugin = load(
        rig,
        {
            "requests_per_second": SLOW,
            "burst": 1,
            "key": "header:x-k",
            "cleanup_interval_s": 0.05,
            "idle_timeout_s": 0.3,
        },
    )
    for i in range(200):
        rig.request(plugin, headers=[("x-k", f"user-{i}")])
    assert len(shared_keys(rig)) == 200
    # keep one bucket busy while the others go idle
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        rig.request(plugin, headers=[("x-k", "busy")])
        rig.run_for(0.05)
    assert shared_keys(rig) == [b"rl:0:busy"]
    # a cleaned-up bucket starts full again
    assert not denied(rig.request(plugin, headers=[("x-k", "user-1")]))


def test_key_count_stays_bounded_under_churn(rig: hosting.FilterRig) -> None:
    plugin = load(
        rig,
        {
            "requests_per_second": SLOW,
            "burst": 1,
            "key": "header:x-k",
            "cleanup_interval_s": 0.05,
            "idle_timeout_s": 0.2,
        },
    )
    peak = 0
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < 1.5:
        for _ in range(20):
            rig.request(plugin, headers=[("x-k", f"c{i}")])
            i += 1
        rig.run_for(0.02)
        peak = max(peak, len(shared_keys(rig)))
    assert i > 200
    assert peak < i  # old buckets were deleted while new ones arrived
    rig.run_for(0.5)
    assert shared_keys(rig) == []


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, "requests_per_second is required"),
        ({"requests_per_second": 0}, "requests_per_second must be positive"),
        ({"requests_per_second": -1}, "requests_per_second must be a non-negative number"),
        ({"requests_per_second": "5"}, "requests_per_second must be a non-negative number"),
        ({"requests_per_second": 5, "burst": 0}, "burst must be at least 1"),
        ({"requests_per_second": 5, "burst": 1.5}, "burst must be a non-negative integer"),
        ({"requests_per_second": 5, "key": "cookie:x"}, 'unknown key "cookie:x"'),
        ({"requests_per_second": 5, "key": "header:"}, 'unknown key "header:"'),
        ({"requests_per_second": 5, "limit": 3}, 'unknown key "limit"'),
        ({"rules": []}, "rules must not be empty"),
        (
            {"rules": [{"requests_per_second": 1}], "requests_per_second": 1},
            'unknown key "requests_per_second"',
        ),
        ({"rules": [{"requests_per_second": 1, "bucket": 1}]}, 'unknown key "bucket" in rules[0]'),
        (
            {"rules": [{"name": "a", "requests_per_second": 1}, {"name": "a", "requests_per_second": 2}]},
            "duplicate rule name",
        ),
        ({"rules": [{"name": "a:b", "requests_per_second": 1}]}, "must not contain ':'"),
        ({"requests_per_second": 5, "idle_timeout_s": 0}, "idle_timeout_s must be positive"),
        (
            {"requests_per_second": 5, "cleanup_interval_s": "often"},
            "cleanup_interval_s must be a non-negative number",
        ),
    ],
)
def test_bad_config_fails_load(rig: hosting.FilterRig, config: dict[str, Any], problem: str) -> None:
    with pytest.raises(abi.PluginLoadError):
        load(rig, config)
    errors = [
        m
        for (_, level, m) in rig.logs
        if level == abi.LogLevel.ERROR and "ratelimit: invalid configuration" in m
    ]
    assert errors, rig.logs
    assert problem in errors[-1]


def test_cleanup_skipped_on_hosts_without_the_foreign_functions(
    rig: hosting.FilterRig, monkeypatch: pytest.MonkeyPatch
) -> None:

    monkeypatch.setattr(abi.hostcalls, "FOREIGN_KEYS", b"not_sluice_shared_data_keys")
    plugin = load(
        rig,
        {
            "requests_per_second": SLOW,
            "burst": 1,
            "key": "header:x-k",
            "cleanup_interval_s": 0.02,
            "idle_timeout_s": 0.05,
        },
    )
    for i in range(5):
        rig.request(plugin, headers=[("x-k", f"k{i}")])
    rig.run_for(0.3)
    assert len(shared_keys(rig)) == 5  # nothing deleted, nothing crashed
    notes = [m for (_, _, m) in rig.logs if "idle bucket cleanup disabled" in m]
    assert len(notes) == 1
    assert denied(rig.request(plugin, headers=[("x-k", "k0")]))
