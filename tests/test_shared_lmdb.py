"""Host-wide shared data and queues on LMDB (sluice/abi/shared_lmdb.py).

The semantics are checked against the in-process store side by side (same answers for the same
calls), then what only the LMDB backend promises: exact CAS between real processes, a bounded size
with counted refusals, data that outlives the process that wrote it, and queue wake-ups delivered
to the process that registered the queue.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.abi import InMemorySharedData, LmdbQueues, LmdbSharedData, LmdbStore, SharedData
from sluice.abi.shared import SharedQueues
from sluice.abi.types import WasmResult

MiB = 1 << 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbStore]:
    s = LmdbStore(tmp_path / "shared", map_size=16 * MiB, max_keys=10_000)
    yield s
    s.close()


@pytest.fixture(params=["memory", "lmdb"])
def data(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SharedData]:
    if request.param == "memory":
        yield InMemorySharedData()
        return
    s = LmdbStore(tmp_path / "shared", map_size=16 * MiB, max_keys=10_000)
    yield LmdbSharedData(s)
    s.close()


# -- same semantics as the in-process store ------------------------------------------------------


def test_cas_rules(data: SharedData) -> None:
    assert data.get("vm", b"k") is None
    assert data.set("vm", b"k", b"one", 12345) is WasmResult.OK  # missing key: CAS ignored
    entry = data.get("vm", b"k")
    assert entry is not None and entry[0] == b"one" and entry[1] != 0
    cas1 = entry[1]
    assert data.set("vm", b"k", b"two", cas1 + 1000) is WasmResult.CAS_MISMATCH
    assert data.get("vm", b"k") == (b"one", cas1)
    assert data.set("vm", b"k", b"two", cas1) is WasmResult.OK
    entry = data.get("vm", b"k")
    assert entry is not None and entry[0] == b"two" and entry[1] != cas1
    assert data.set("vm", b"k", b"three", cas1) is WasmResult.CAS_MISMATCH
    assert data.set("vm", b"k", b"four", 0) is WasmResult.OK
    assert data.set("vm", b"empty", b"", 0) is WasmResult.OK
    assert data.get("vm", b"empty") is not None and data.get("vm", b"empty")[0] == b""  # type: ignore[index]


def test_vm_ids_isolated_keys_and_delete(data: SharedData) -> None:
    for key in (b"rl:1", b"rl:2", b"other"):
        assert data.set("vm", key, b"x", 0) is WasmResult.OK
    data.set("vm2", b"rl:9", b"y", 0)
    data.set("vm\0", b"rl:8", b"z", 0)  # a vm_id that is a prefix of another must not leak
    assert sorted(data.keys("vm", b"rl:")) == [b"rl:1", b"rl:2"]
    assert sorted(data.keys("vm", b"")) == [b"other", b"rl:1", b"rl:2"]
    assert data.keys("nope", b"") == []
    entry = data.get("vm", b"rl:1")
    assert entry is not None
    assert data.delete("vm", b"rl:1", entry[1] + 1) is WasmResult.CAS_MISMATCH
    assert data.delete("vm", b"rl:1", entry[1]) is WasmResult.OK
    assert data.delete("vm", b"rl:1", 0) is WasmResult.NOT_FOUND
    assert data.get("vm", b"rl:1") is None
    assert data.get("vm2", b"rl:9") == (b"y", data.get("vm2", b"rl:9")[1])  # type: ignore[index]


def test_global_cas_counter_never_zero_on_wrap(store: LmdbStore) -> None:
    data = LmdbSharedData(store)
    with store.env.begin(write=True) as txn:  # drive the counter to the 32-bit wrap
        txn.put(b"cas", (0xFFFFFFFE).to_bytes(4, "little"), db=store.meta)
    seen = []
    for i in range(4):
        assert data.set("vm", f"k{i}".encode(), b"v", 0) is WasmResult.OK
        seen.append(data.get("vm", f"k{i}".encode())[1])  # type: ignore[index]
    assert 0 not in seen and len(set(seen)) == 4


# -- only LMDB -----------------------------------------------------------------------------------

_INCREMENTER = textwrap.dedent(
    """
    import sys
    from sluice.abi import LmdbSharedData, LmdbStore
    from sluice.abi.types import WasmResult
    store = LmdbStore(sys.argv[1], map_size=16 << 20, max_keys=1000)
    data = LmdbSharedData(store)
    mismatches = 0
    for _ in range(int(sys.argv[2])):
        while True:
            entry = data.get("vm", b"n")
            value, cas = (int(entry[0]), entry[1]) if entry else (0, 0)
            if data.set("vm", b"n", str(value + 1).encode(), cas) is WasmResult.OK:
                break
            mismatches += 1
    print(mismatches)
    """
)


def test_cas_is_exact_across_processes(store: LmdbStore) -> None:
    data = LmdbSharedData(store)
    assert data.set("vm", b"n", b"0", 0) is WasmResult.OK  # created once: CAS 0 writes blindly
    procs, each = 4, 1500
    children = [
        subprocess.Popen([sys.executable, "-c", _INCREMENTER, str(store.path), str(each)], stdout=subprocess.PIPE)
        for _ in range(procs)
    ]
    mismatches = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        mismatches.append(int(out))
    entry = data.get("vm", b"n")
    assert entry is not None and int(entry[0]) == procs * each  # no increment lost, however they interleaved


def test_a_write_in_another_process_makes_the_cas_stale(store: LmdbStore) -> None:
    data = LmdbSharedData(store)
    assert data.set("vm", b"k", b"mine", 0) is WasmResult.OK
    entry = data.get("vm", b"k")
    assert entry is not None
    code = (
        "import sys; from sluice.abi import LmdbSharedData, LmdbStore; "
        "LmdbSharedData(LmdbStore(sys.argv[1], map_size=1<<24, max_keys=10)).set('vm', b'k', b'theirs', 0)"
    )
    subprocess.run([sys.executable, "-c", code, str(store.path)], check=True, timeout=60)
    assert data.set("vm", b"k", b"late", entry[1]) is WasmResult.CAS_MISMATCH
    current = data.get("vm", b"k")
    assert current is not None and current[0] == b"theirs" and current[1] != entry[1]
    assert data.set("vm", b"k", b"retried", current[1]) is WasmResult.OK


def test_data_outlives_the_process_that_wrote_it(tmp_path: Path) -> None:
    path = tmp_path / "shared"
    code = (
        "import sys; from sluice.abi import LmdbSharedData, LmdbStore; "
        "LmdbSharedData(LmdbStore(sys.argv[1], map_size=1<<24, max_keys=10)).set('vm', b'k', b'kept', 0)"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    store = LmdbStore(path, map_size=16 * MiB, max_keys=10)
    try:
        assert LmdbSharedData(store).get("vm", b"k") == (b"kept", 1)
    finally:
        store.close()


def test_full_store_refuses_new_keys_and_counts(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "shared", map_size=16 * MiB, max_keys=3)
    try:
        data = LmdbSharedData(store)
        for i in range(3):
            assert data.set("vm", f"k{i}".encode(), b"v", 0) is WasmResult.OK
        assert data.set("vm", b"k3", b"v", 0) is WasmResult.INTERNAL_FAILURE
        assert data.set("other", b"k", b"v", 0) is WasmResult.INTERNAL_FAILURE  # the bound is host-wide
        assert data.refused == 2
        assert data.set("vm", b"k0", b"updated", 0) is WasmResult.OK  # existing keys still update
        assert data.delete("vm", b"k1", 0) is WasmResult.OK
        assert data.set("vm", b"k3", b"v", 0) is WasmResult.OK  # room again
        assert data.entries() == 3
    finally:
        store.close()


def test_full_map_refuses_and_counts(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path / "shared", map_size=1 * MiB, max_keys=1_000_000)
    try:
        data = LmdbSharedData(store)
        results = [data.set("vm", f"k{i}".encode(), b"x" * 1000, 0) for i in range(2000)]
        assert WasmResult.INTERNAL_FAILURE in results
        assert data.refused == results.count(WasmResult.INTERNAL_FAILURE)
        assert data.get("vm", b"k0") is not None  # what was stored stays readable
    finally:
        store.close()


# -- queues --------------------------------------------------------------------------------------


def test_queue_semantics_match_the_in_process_queues(store: LmdbStore) -> None:
    lmdb_queues = LmdbQueues(store, "w0")
    try:
        for queues in (SharedQueues(), lmdb_queues):
            woken: list[int] = []
            token = queues.register("vm", b"q", woken.append)
            assert token != 0
            assert queues.register("vm", b"q", woken.append) == token  # same name, same token
            assert queues.resolve("vm", b"q") == token
            assert queues.resolve("vm", b"nope") is None
            assert queues.resolve("other", b"q") is None
            assert queues.dequeue(token) is WasmResult.EMPTY
            assert queues.enqueue(token, b"one") is WasmResult.OK
            assert queues.enqueue(token, b"two") is WasmResult.OK
            assert woken == [token, token]
            assert queues.dequeue(token) == b"one"
            assert queues.dequeue(token) == b"two"
            assert queues.dequeue(token) is WasmResult.EMPTY
            assert queues.enqueue(token + 1000, b"x") is WasmResult.NOT_FOUND
            assert queues.dequeue(token + 1000) is WasmResult.NOT_FOUND
            queues.unbind(woken.append)
    finally:
        lmdb_queues.close()


_ENQUEUER = textwrap.dedent(
    """
    import sys
    from sluice.abi import LmdbQueues, LmdbStore
    store = LmdbStore(sys.argv[1], map_size=16 << 20, max_keys=1000)
    queues = LmdbQueues(store, "enqueuer")
    token = queues.resolve("vm", b"jobs")
    for i in range(int(sys.argv[2])):
        assert queues.enqueue(token, f"job{i}".encode()).name == "OK"
    """
)


def test_enqueue_in_another_process_wakes_the_registrant(store: LmdbStore) -> None:
    queues = LmdbQueues(store, "owner")
    loop = asyncio.new_event_loop()
    try:
        got: list[bytes] = []
        done = loop.create_future()

        def ready(token: int) -> None:
            while isinstance(item := queues.dequeue(token), bytes):
                got.append(item)
            if len(got) == 5 and not done.done():
                done.set_result(None)

        queues.register("vm", b"jobs", ready)
        loop.add_reader(queues.fileno(), queues.drain_notifications)

        async def run() -> None:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _ENQUEUER, str(store.path), "5")
            assert await proc.wait() == 0
            await asyncio.wait_for(done, 10)

        loop.run_until_complete(run())
        assert got == [f"job{i}".encode() for i in range(5)]
    finally:
        loop.remove_reader(queues.fileno())
        loop.close()
        queues.close()


def test_items_enqueued_while_the_owner_is_down_wake_it_on_register(store: LmdbStore) -> None:
    first = LmdbQueues(store, "w1")
    token = first.register("vm", b"q", lambda t: None)
    first.close()  # the worker died
    other = LmdbQueues(store, "w2")
    try:
        assert other.enqueue(token, b"while-down") is WasmResult.OK  # the wake-up datagram is lost
    finally:
        other.close()
    restarted = LmdbQueues(store, "w1")
    try:
        woken: list[int] = []
        assert restarted.register("vm", b"q", woken.append) == token
        assert woken == [token]
        assert restarted.dequeue(token) == b"while-down"
    finally:
        restarted.close()
