"""Writing compiled code to the on-disk cache (modules and components alike)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def store(path: Path, data: bytes | bytearray) -> None:
    """Write `data` to `path` atomically (a concurrent reader never sees half a file).

    Errors are swallowed: a read-only cache directory only costs compile time.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except OSError:
        pass
