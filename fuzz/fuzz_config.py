#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris) of the config loader: YAML text in, a SluiceConfig or a
ConfigError out. Anything else (another exception, a crash) is a finding.

    python fuzz/fuzz_config.py -max_total_time=60 [corpus_dir]

The seed corpus is the shipped demo config; `make fuzz` runs every target for a bounded time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import atheris
from harness import fuzz

with atheris.instrument_imports(include=["sluice"]):
    from sluice import DEMO_CONFIG
    from sluice.proxy.config import ConfigError, parse_config

BASE = Path(tempfile.gettempdir())


def test_one(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    try:
        parse_config(text, source="fuzz.yaml", base_dir=BASE)
    except ConfigError as exc:
        for line in exc.errors:
            if not line.startswith("fuzz.yaml"):
                raise AssertionError(f"error line does not name the file: {line!r}") from None


def main() -> None:
    fuzz(test_one, {"demo.yaml": DEMO_CONFIG.read_bytes()}, "sluice-fuzz-config-")


if __name__ == "__main__":
    main()
