"""What every fuzz target shares: seeds in a fresh corpus directory unless one is given, then
atheris. (Not a target itself: `make fuzz` runs fuzz/fuzz_*.py.)"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import atheris


def fuzz(test_one: Callable[[bytes], None], seeds: Mapping[str, bytes], prefix: str) -> None:
    """Run `test_one` under libFuzzer with `sys.argv`; `seeds` (file name -> bytes) start the
    corpus when the command line names no corpus directory."""
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = Path(tempfile.mkdtemp(prefix=prefix))
        for name, data in seeds.items():
            (corpus / name).write_bytes(data)
        argv.append(str(corpus))
    atheris.Setup(argv, test_one)
    atheris.Fuzz()
