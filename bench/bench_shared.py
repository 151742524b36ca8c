"""Shared data: µs per get and per CAS set, in-process store vs the host-wide LMDB store.

    python bench/bench_shared.py [--n 200000] [--dir /dev/shm]

A "CAS set" is what a filter's update costs: get (value and CAS), then set with that CAS. The
LMDB store runs with the settings sluice uses (sync off); its directory defaults to a temporary
one under --dir (tmpfs is what docs/scaling.md recommends). Medians of 5 rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

from sluice.abi import InMemorySharedData, LmdbSharedData, LmdbStore, SharedData


def per_op_us(fn: Callable[[], None], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


def measure(data: SharedData, n: int) -> tuple[float, float]:
    data.set("vm", b"rl:bench:key", b"x" * 16, 0)

    def get() -> None:
        data.get("vm", b"rl:bench:key")

    def cas_set() -> None:
        entry = data.get("vm", b"rl:bench:key")
        assert entry is not None
        data.set("vm", b"rl:bench:key", entry[0], entry[1])

    gets = [per_op_us(get, n) for _ in range(5)]
    sets = [per_op_us(cas_set, n // 4) for _ in range(5)]
    return statistics.median(gets), statistics.median(sets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dir", default=None, help="where the LMDB directory goes (default: the temp dir)")
    args = parser.parse_args()
    rows = [("memory (in-process)", *measure(InMemorySharedData(), args.n))]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = LmdbStore(tmp, map_size=64 << 20, max_keys=100_000)
        rows.append((f"lmdb ({tmp})", *measure(LmdbSharedData(store), args.n)))
        store.close()
    print(f"{'backend':40} {'get µs':>8} {'CAS set µs':>11}")
    for name, get_us, set_us in rows:
        print(f"{name:40} {get_us:8.2f} {set_us:11.2f}")


if __name__ == "__main__":
    main()
