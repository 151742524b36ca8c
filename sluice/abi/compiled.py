"""`CompiledModule`: a validated, compiled proxy-wasm module, ready to instantiate (made by
`Runtime.compile`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import wasmtime


@dataclasses.dataclass(frozen=True)
class CompiledModule:
    path: Path
    sha256: str
    size: int
    abi_version: str
    module: wasmtime.Module
    instance_pre: wasmtime.InstancePre
    compile_seconds: float
    from_cache: bool
    unknown_imports: tuple[str, ...] = ()
    """`env.proxy_*` imports sluice does not define, linked to stubs answering UNIMPLEMENTED."""
