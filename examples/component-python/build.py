#!/usr/bin/env python3
"""Build examples/component-python/app.py into a `sluice:filter@0.1.0` component with
componentize-py (pinned in pyproject's `build` extra), cached.

    python examples/component-python/build.py     # prints the path of the built component

The output (about 18 MB: it carries CPython) is not committed, and componentize-py's output is
not byte-for-byte reproducible (its pre-initialised snapshot differs per run), so it is built
into build/ (git-ignored) and reused while the inputs are unchanged: app.py, the WIT package
and the componentize-py version, hashed into build/app.inputs. A build takes ~30 s.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WIT = REPO / "sluice" / "config" / "wit"
OUT_DIR = HERE / "build"
OUTPUT = OUT_DIR / "app.wasm"
STAMP = OUT_DIR / "app.inputs"
COMPONENTIZE_PY = "0.25.1"


def inputs_digest() -> str:
    digest = hashlib.sha256(f"componentize-py {COMPONENTIZE_PY}\n".encode())
    for path in [HERE / "app.py", *sorted(WIT.rglob("*.wit"))]:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def tool() -> str:
    try:
        version = metadata.version("componentize-py")
    except metadata.PackageNotFoundError:
        raise SystemExit(f"componentize-py is not installed (pip install componentize-py=={COMPONENTIZE_PY})") from None
    if version != COMPONENTIZE_PY:
        raise SystemExit(f"componentize-py {version} is installed; this example pins {COMPONENTIZE_PY}")
    found = shutil.which("componentize-py", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    if found is None:
        raise SystemExit("componentize-py is installed but its command is not on PATH")
    return found


def build() -> Path:
    digest = inputs_digest()
    if OUTPUT.is_file() and STAMP.is_file() and STAMP.read_text().strip() == digest:
        return OUTPUT
    command = tool()
    OUT_DIR.mkdir(exist_ok=True)
    tmp = OUTPUT.with_suffix(".tmp")
    subprocess.run(
        [command, "-q", "-d", str(WIT), "-w", "filter", "componentize", "-p", str(HERE), "app", "-o", str(tmp)],
        check=True, cwd=HERE,
    )
    os.replace(tmp, OUTPUT)
    STAMP.write_text(digest + "\n")
    return OUTPUT


if __name__ == "__main__":
    print(build())
