"""The config models of scaling out: `workers:` and the `shared_data:` section.

Kept apart from sluice/proxy/config.py (which only names them as fields of `SluiceConfig`) so that
the worker and shared-data settings live in one place. docs/scaling.md explains them.

```yaml
workers: 2            # or `auto`: one per core (os.process_cpu_count); default 1
shared_data:
  backend: auto       # memory | lmdb | auto (memory for one worker, lmdb for more)
  path: shared-data   # LMDB directory, relative to the config file; default <cache_dir>/shared-data
  map_size: 64MiB     # upper bound of the LMDB file
  max_keys: 100000    # shared-data keys, all filters together; a new key beyond it is refused
```
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationInfo, field_validator

__all__ = ["SharedDataBackend", "SharedDataConfig", "Workers", "resolve_workers"]

MiB = 1 << 20
MAX_WORKERS = 256


class SharedDataBackend(enum.Enum):
    AUTO = "auto"
    MEMORY = "memory"
    LMDB = "lmdb"


def _no_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError(f"must be a whole number (got {str(value).lower()})")
    return value


def _workers(value: object) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    raise ValueError(f"must be a number of processes from 1 to {MAX_WORKERS}, or auto (got {value!r})")


Workers = Annotated[int | Literal["auto"], PlainValidator(_workers)]
"""`workers:` a count of processes (1..256) or `auto`."""


def resolve_workers(value: int | Literal["auto"]) -> int:
    """The number of worker processes `workers:` asks for on this host."""
    if value == "auto":
        cores = getattr(os, "process_cpu_count", os.cpu_count)() or 1
        return max(1, min(cores, MAX_WORKERS))
    return value


def _size(value: object) -> object:
    # The one size syntax of the config ("64MiB"); imported when used, as config.py imports this module.
    from .config import _parse_size

    return _parse_size(value)


class SharedDataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: SharedDataBackend = SharedDataBackend.AUTO
    path: Path | None = None
    map_size: Annotated[int, BeforeValidator(_size), Field(ge=MiB)] = 64 * MiB
    max_keys: Annotated[int, BeforeValidator(_no_bool), Field(gt=0)] = 100_000

    @field_validator("path")
    @classmethod
    def _relative_to_config(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        context = info.context if isinstance(info.context, Mapping) else {}
        return (Path(context.get("base_dir", ".")) / value).resolve()

    def backend_for(self, workers: int) -> SharedDataBackend:
        """The backend in effect: `auto` is the in-process store for one worker (it is faster)."""
        if self.backend is SharedDataBackend.AUTO:
            return SharedDataBackend.MEMORY if workers == 1 else SharedDataBackend.LMDB
        return self.backend

    def lmdb_path(self, cache_dir: Path) -> Path:
        return self.path if self.path is not None else cache_dir / "shared-data"
