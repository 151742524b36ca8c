#!/usr/bin/env python3
"""Build examples/component-zig/tag.wasm: Zig (PyPI ziglang==0.14.1) for wasm32-freestanding, the
core module wrapped into a `sluice:filter@0.1.0` component with the pinned wasm-tools of
tests/fixtures/components/build.py. Deterministic: fixed flags, stripped, a fixed cache dir.

    python examples/component-zig/build.py            # rebuild tag.wasm in place
    python examples/component-zig/build.py --check    # rebuild into a temp dir and compare bytes
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("component_build", REPO / "tests/fixtures/components/build.py")
assert _spec is not None and _spec.loader is not None
component_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(component_build)
wrap = component_build.wrap  # the pinned wasm-tools' embed + new

SOURCE = HERE / "tag.zig"
OUTPUT = HERE / "tag.wasm"
CACHE_DIR = Path(tempfile.gettempdir()) / "sluice-zig-cache"
FLAGS = ("-target", "wasm32-freestanding", "-O", "ReleaseSmall", "-fstrip", "-fno-entry", "-rdynamic",
         "-fsingle-threaded")


def build(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        core = Path(tmp) / "tag_core.wasm"
        subprocess.run(
            [sys.executable, "-m", "ziglang", "build-exe", *FLAGS, "--cache-dir", str(CACHE_DIR / "local"),
             "--global-cache-dir", str(CACHE_DIR / "global"), f"-femit-bin={core}", str(SOURCE.relative_to(REPO))],
            cwd=REPO, check=True,
        )
        wrap(core, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if not args.check:
        build(OUTPUT)
        print(f"built {OUTPUT.relative_to(REPO)} ({OUTPUT.stat().st_size} bytes)", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "tag.wasm"
        build(fresh)
        if not OUTPUT.is_file() or OUTPUT.read_bytes() != fresh.read_bytes():
            print(f"{OUTPUT.relative_to(REPO)} is out of date (run examples/component-zig/build.py)", file=sys.stderr)
            return 1
    print(f"{OUTPUT.relative_to(REPO)} matches its source", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
