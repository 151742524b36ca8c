"""Shared data and queues: the AssemblyScript `shared_cas` fixture (get + CAS set loop on key
`hits`), and the `InMemorySharedData` / `SharedQueues` semantics directly (cpp-host's)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from hosting import FilterRig

from sluice.abi import InMemorySharedData
from sluice.abi.shared import SharedQueues
from sluice.abi.types import WasmResult

SHARED_CAS = Path(__file__).resolve().parent / "fixtures" / "as" / "build" / "shared_cas.wasm"


@pytest.fixture
def rig() -> Iterator[FilterRig]:
    with FilterRig() as r:
        yield r


def hits(rig: FilterRig, vm_id: str) -> int:
    entry = rig.shared_data.get(vm_id, b"hits")
    assert entry is not None
    value, cas = entry
    assert cas != 0
    return int(value)


# -- the fixture ---------------------------------------------------------------------------------


def test_sequential_counting(rig: FilterRig) -> None:
    plugin = rig.load(SHARED_CAS, vm_id="count")
    assert rig.shared_data.get("count", b"hits") is None
    for i in range(1, 21):
        ex = rig.request(plugin, headers=[("x-hits", "client-sent")])
        assert ex.request_headers.get_all("x-hits") == [str(i)]  # replaced, not appended
        assert ex.response_headers is not None
        assert ex.response_headers.get("x-hits") == str(i)
    assert hits(rig, "count") == 20
    assert plugin.report().counters.traps == 0


def test_counter_survives_a_new_plugin_with_same_vm_id(rig: FilterRig) -> None:
    first = rig.load(SHARED_CAS, name="first", vm_id="keep")
    for _ in range(3):
        rig.request(first)
    first.retire()
    second = rig.load(SHARED_CAS, name="second", vm_id="keep")
    ex = rig.request(second)
    assert ex.request_headers.get("x-hits") == "4"


def test_cas_under_contention_two_vms(rig: FilterRig) -> None:
    vm_id = "contended"
    a = rig.load(SHARED_CAS, name="a", vm_id=vm_id)
    b = rig.load(SHARED_CAS, name="b", vm_id=vm_id)
    assert a._vm is not b._vm
    # Create the key first: with CAS 0 two VMs creating it at the same moment may both write 1.
    assert rig.request(a).request_headers.get("x-hits") == "1"
    n = 400

    async def all_requests() -> list:
        return list(await asyncio.gather(*(
            rig.exchange(a if i % 2 else b, "GET", f"/{i}") for i in range(n)
        )))

    results = rig.loop.run_until_complete(all_requests())
    seen = [ex.request_headers.get("x-hits") for ex in results]
    assert all(s is not None for s in seen)
    values = sorted(int(s) for s in seen if s is not None)
    assert values == list(range(2, n + 2))  # every value unique, none lost
    for ex in results:
        assert ex.response_headers is not None
        assert ex.response_headers.get("x-hits") == ex.request_headers.get("x-hits")
    assert hits(rig, vm_id) == n + 1
    assert a.report().counters.traps == 0 and b.report().counters.traps == 0


def test_cas_mismatch_is_retried_by_the_filter(rig: FilterRig) -> None:
    """Interleave a foreign write between the filter's get and set: the filter must retry."""
    vm_id = "interleave"
    plugin = rig.load(SHARED_CAS, vm_id=vm_id)
    rig.request(plugin)
    shared = rig.shared_data
    real_get = shared.get
    state = {"armed": True}

    def racing_get(vid: str, key: bytes):  # type: ignore[no-untyped-def]
        entry = real_get(vid, key)
        if state["armed"] and vid == vm_id and key == b"hits":
            state["armed"] = False
            shared.set(vid, key, b"100", 0)  # another worker wins the race
        return entry

    shared.get = racing_get  # type: ignore[method-assign]
    try:
        ex = rig.request(plugin)
    finally:
        del shared.get  # type: ignore[attr-defined]
    assert ex.request_headers.get("x-hits") == "101"
    assert hits(rig, vm_id) == 101


def test_vm_ids_isolated(rig: FilterRig) -> None:
    x = rig.load(SHARED_CAS, name="x", vm_id="iso-x")
    y = rig.load(SHARED_CAS, name="y", vm_id="iso-y")
    for _ in range(5):
        rig.request(x)
    assert rig.request(y).request_headers.get("x-hits") == "1"
    assert hits(rig, "iso-x") == 5
    assert hits(rig, "iso-y") == 1


def test_non_numeric_value_restarts_from_zero(rig: FilterRig) -> None:
    rig.shared_data.set("junk", b"hits", b"12a", 0)
    plugin = rig.load(SHARED_CAS, vm_id="junk")
    assert rig.request(plugin).request_headers.get("x-hits") == "1"


# -- InMemorySharedData ----------------------------------------------------------------------------


def test_shared_data_get_missing() -> None:
    data = InMemorySharedData()
    assert data.get("vm", b"k") is None
    assert data.keys("vm", b"") == []


def test_shared_data_global_cas_counter() -> None:
    data = InMemorySharedData()
    assert data.set("a", b"k1", b"v", 0) is WasmResult.OK
    assert data.set("b", b"k2", b"v", 0) is WasmResult.OK
    assert data.set("a", b"k3", b"v", 0) is WasmResult.OK
    cas = [data.get(v, k)[1] for v, k in (("a", b"k1"), ("b", b"k2"), ("a", b"k3"))]  # type: ignore[index]
    assert len(set(cas)) == 3  # one counter across keys and vm_ids
    assert cas == sorted(cas)
    assert 0 not in cas


def test_shared_data_cas_rules() -> None:
    data = InMemorySharedData()
    # Missing key: any CAS is ignored.
    assert data.set("vm", b"k", b"one", 12345) is WasmResult.OK
    value, cas1 = data.get("vm", b"k")  # type: ignore[misc]
    assert value == b"one"
    # Stale CAS: mismatch, value unchanged.
    assert data.set("vm", b"k", b"two", cas1 + 1000) is WasmResult.CAS_MISMATCH
    assert data.get("vm", b"k") == (b"one", cas1)
    # Current CAS: OK, CAS changes.
    assert data.set("vm", b"k", b"two", cas1) is WasmResult.OK
    value, cas2 = data.get("vm", b"k")  # type: ignore[misc]
    assert value == b"two" and cas2 != cas1
    # The old CAS is now stale.
    assert data.set("vm", b"k", b"three", cas1) is WasmResult.CAS_MISMATCH
    # CAS 0: unconditional.
    assert data.set("vm", b"k", b"four", 0) is WasmResult.OK
    value, cas3 = data.get("vm", b"k")  # type: ignore[misc]
    assert value == b"four" and cas3 not in (0, cas1, cas2)
    # Empty values are values.
    assert data.set("vm", b"empty", b"", 0) is WasmResult.OK
    assert data.get("vm", b"empty")[0] == b""  # type: ignore[index]


def test_shared_data_cas_never_zero_on_wrap() -> None:
    data = InMemorySharedData()
    data._cas = 0xFFFFFFFE  # noqa: SLF001 - drive the counter to the 32-bit wrap
    casses = []
    for i in range(4):
        assert data.set("vm", b"k", str(i).encode(), 0) is WasmResult.OK
        casses.append(data.get("vm", b"k")[1])  # type: ignore[index]
    assert 0 not in casses
    assert all(0 < c <= 0xFFFFFFFF for c in casses)
    assert len(set(casses)) == 4


def test_shared_data_vm_ids_isolated() -> None:
    data = InMemorySharedData()
    data.set("a", b"k", b"A", 0)
    data.set("b", b"k", b"B", 0)
    assert data.get("a", b"k")[0] == b"A"  # type: ignore[index]
    assert data.get("b", b"k")[0] == b"B"  # type: ignore[index]
    assert data.get("c", b"k") is None
    assert data.keys("a", b"") == [b"k"]


def test_shared_data_delete_and_keys() -> None:
    data = InMemorySharedData()
    for key in (b"rl:1", b"rl:2", b"other"):
        data.set("vm", key, b"x", 0)
    assert sorted(data.keys("vm", b"rl:")) == [b"rl:1", b"rl:2"]
    assert sorted(data.keys("vm", b"")) == [b"other", b"rl:1", b"rl:2"]
    assert data.keys("nope", b"") == []
    _, cas = data.get("vm", b"rl:1")  # type: ignore[misc]
    assert data.delete("vm", b"rl:1", cas + 1) is WasmResult.CAS_MISMATCH
    assert data.get("vm", b"rl:1") is not None
    assert data.delete("vm", b"rl:1", cas) is WasmResult.OK
    assert data.get("vm", b"rl:1") is None
    assert data.delete("vm", b"rl:1", 0) is WasmResult.NOT_FOUND
    assert data.delete("vm", b"rl:2", 0) is WasmResult.OK  # 0: unconditional
    assert data.delete("missing-vm", b"k", 0) is WasmResult.NOT_FOUND
    assert data.keys("vm", b"rl:") == []
    # A deleted key can be created again with any CAS.
    assert data.set("vm", b"rl:1", b"y", cas) is WasmResult.OK
    assert data.size("vm") == 2


# -- SharedQueues --------------------------------------------------------------------------------


def test_queues_register_resolve() -> None:
    q = SharedQueues()
    ready: list[int] = []
    t1 = q.register("vm", b"q1", ready.append)
    t2 = q.register("vm", b"q2", ready.append)
    t3 = q.register("other", b"q1", ready.append)
    assert t1 >= 1 and len({t1, t2, t3}) == 3
    assert q.register("vm", b"q1", ready.append) == t1  # same (vm_id, name): same token
    assert q.resolve("vm", b"q1") == t1
    assert q.resolve("other", b"q1") == t3
    assert q.resolve("vm", b"nope") is None
    assert q.resolve("nope", b"q1") is None


def test_queues_enqueue_dequeue() -> None:
    q = SharedQueues()
    ready: list[int] = []
    token = q.register("vm", b"q", ready.append)
    assert q.dequeue(token) is WasmResult.EMPTY
    assert q.enqueue(token, b"a") is WasmResult.OK
    assert q.enqueue(token, b"") is WasmResult.OK
    assert q.enqueue(token, b"c") is WasmResult.OK
    assert ready == [token, token, token]  # one notification per enqueue
    assert q.dequeue(token) == b"a"
    assert q.dequeue(token) == b""
    assert q.dequeue(token) == b"c"
    assert q.dequeue(token) is WasmResult.EMPTY
    assert q.enqueue(token + 100, b"x") is WasmResult.NOT_FOUND
    assert q.dequeue(token + 100) is WasmResult.NOT_FOUND
    assert q.dequeue(0) is WasmResult.NOT_FOUND


def test_queues_rebind_and_unbind() -> None:
    q = SharedQueues()
    first: list[int] = []
    second: list[int] = []
    on_first, on_second = first.append, second.append
    token = q.register("vm", b"q", on_first)
    assert q.register("vm", b"q", on_second) == token  # the latest registrant is notified
    q.enqueue(token, b"1")
    assert first == [] and second == [token]
    q.unbind(on_first)  # not the current registrant: nothing changes
    q.enqueue(token, b"2")
    assert second == [token, token]
    q.unbind(on_second)  # the registrant went away: no more notifications, the data stays
    assert q.enqueue(token, b"3") is WasmResult.OK
    assert second == [token, token] and first == []
    assert [q.dequeue(token) for _ in range(4)] == [b"1", b"2", b"3", WasmResult.EMPTY]
    assert q.resolve("vm", b"q") == token


# -- shared queues through a real module ------------------------------------------------------------

QUEUE_WAT = """(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $register (param i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $dequeue (param i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 4096))
  (global $token (mut i32) (i32.const 0))
  (data (i32.const 16) "jobs")
  (data (i32.const 32) "job-from-request")
  (data (i32.const 64) "registered")
  (func (export "proxy_abi_version_0_2_0"))
  (func (export "malloc") (param i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get 0)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (if (i32.eqz (call $register (i32.const 16) (i32.const 4) (i32.const 1024))) (then
      (global.set $token (i32.load (i32.const 1024)))
      (drop (call $log (i32.const 2) (i32.const 64) (i32.const 10)))))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $enqueue (global.get $token) (i32.const 32) (i32.const 16)))
    (i32.const 0))
  ;; drain the queue, logging every item
  (func (export "proxy_on_queue_ready") (param i32 i32)
    (block $done
      (loop $next
        (br_if $done (call $dequeue (local.get 1) (i32.const 1024) (i32.const 1028)))
        (drop (call $log (i32.const 2) (i32.load (i32.const 1024)) (i32.load (i32.const 1028))))
        (br $next))))
)"""


def test_queue_ready_delivered_to_registrant(rig: FilterRig, tmp_path: Path) -> None:
    import wasmtime

    path = tmp_path / "queue.wasm"
    path.write_bytes(bytes(wasmtime.wat2wasm(QUEUE_WAT)))
    plugin = rig.load(path, name="q", vm_id="qvm")
    queues = rig.runtime.queues
    token = queues.resolve("qvm", b"jobs")
    assert token is not None and token >= 1
    assert queues.resolve("other", b"jobs") is None

    def items() -> list[str]:
        return [m for p, _, m in rig.logs if p == "q" and m != "registered"]

    assert [m for p, _, m in rig.logs if p == "q"] == ["registered"]
    rig.request(plugin)
    rig.request(plugin)
    assert queues.enqueue(token, b"external") is WasmResult.OK
    rig.run_for(0.1)  # proxy_on_queue_ready is posted, never called from inside enqueue
    assert items() == ["job-from-request", "job-from-request", "external"]
    assert queues.dequeue(token) is WasmResult.EMPTY
    # A retired registrant is not notified any more; the queue keeps the data.
    plugin.retire()
    assert queues.enqueue(token, b"late") is WasmResult.OK
    rig.run_for(0.1)
    assert items() == ["job-from-request", "job-from-request", "external"]
    assert queues.dequeue(token) == b"late"
