#!/usr/bin/env python3
"""Rebuild sluice's built-in Zig filters (and the Zig example) byte for byte.

    python sluice/filters/build.py            # rebuild sluice/filters/auth.wasm, ratelimit.wasm, ab.wasm,
                                       # examples/zig-filter/add_header.wasm and the test fixture
                                       # tests/fixtures/zig/node_stats.wasm in place
    python sluice/filters/build.py --check    # rebuild into a temp dir; exit 1 naming each stale file

Needs the PyPI package `ziglang==0.14.1` (`pip install -e .[build]`), run as `python -m ziglang`.
The build is deterministic: fixed flags, paths relative to the repository root, a fixed cache
directory under the system temp dir, stripped output (no paths embedded).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
ZIG_VERSION = "0.14.1"
SDK = "sluice/filters/sdk/proxy_wasm.zig"
CACHE_DIR = Path(tempfile.gettempdir()) / "sluice-zig-cache"

FLAGS: tuple[str, ...] = (
    "-target",
    "wasm32-wasi",
    "-O",
    "ReleaseSmall",
    "-fstrip",
    "-fno-entry",  # reactor: no _start; the proxy_on_* functions are exported
    "-rdynamic",
    "-fsingle-threaded",
    # Zig's default wasm stack is 16 MiB, all of it in the initial linear memory: every VM would
    # start at 16 MiB of a 64 MiB cap. The filters need a few KiB; 1 MiB leaves ample headroom.
    "--stack",
    "1048576",
)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    source: str
    output: str


TARGETS: tuple[Target, ...] = (
    Target("auth", "sluice/filters/src/auth.zig", "sluice/filters/auth.wasm"),
    Target("ratelimit", "sluice/filters/src/ratelimit.zig", "sluice/filters/ratelimit.wasm"),
    Target("ab", "sluice/filters/src/ab.zig", "sluice/filters/ab.wasm"),
    Target("add_header", "examples/zig-filter/add_header.zig", "examples/zig-filter/add_header.wasm"),
    # Test fixtures: filters the tests run through the live proxy.
    Target("node_stats", "tests/fixtures/zig/node_stats.zig", "tests/fixtures/zig/node_stats.wasm"),
)


def zig_command(target: Target, out_rel: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ziglang",
        "build-exe",
        *FLAGS,
        "--cache-dir",
        str(CACHE_DIR / "local"),
        "--global-cache-dir",
        str(CACHE_DIR / "global"),
        "--dep",
        "proxy_wasm",
        f"-M{target.name}={target.source}",
        f"-Mproxy_wasm={SDK}",
        f"-femit-bin={out_rel}",
    ]


def check_zig() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ziglang", "version"], cwd=REPO, capture_output=True, text=True
    )
    version = proc.stdout.strip()
    if proc.returncode != 0 or version != ZIG_VERSION:
        raise SystemExit(
            f"build.py needs zig {ZIG_VERSION} via `python -m ziglang` (pip install ziglang=={ZIG_VERSION});"
            f" got {version or proc.stderr.strip() or 'nothing'}"
        )


def build(target: Target, dest: Path) -> None:
    """Compile `target` into `dest` (any path); the compiler only sees repository-relative paths."""
    with tempfile.TemporaryDirectory(dir=REPO / "sluice" / "filters", prefix=".build-") as tmp:
        out_rel = os.path.relpath(Path(tmp) / f"{target.name}.wasm", REPO)
        proc = subprocess.run(zig_command(target, out_rel), cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"build of {target.source} failed")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / out_rel, dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed .wasm is stale")
    parser.add_argument("targets", nargs="*", help="names to build (default: all)")
    args = parser.parse_args(argv)
    check_zig()
    wanted = [t for t in TARGETS if not args.targets or t.name in args.targets]
    if args.targets and len(wanted) != len(set(args.targets)):
        known = ", ".join(t.name for t in TARGETS)
        parser.error(f"unknown target (known: {known})")
    if not args.check:
        for t in wanted:
            build(t, REPO / t.output)
            print(f"{t.output}: {(REPO / t.output).stat().st_size} bytes")
        return 0
    stale: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in wanted:
            fresh = Path(tmp) / f"{t.name}.wasm"
            build(t, fresh)
            committed = REPO / t.output
            if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
                stale.append(t.output)
    for path in stale:
        print(f"stale: {path} (run python sluice/filters/build.py)", file=sys.stderr)
    if not stale:
        print("all filters up to date")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
