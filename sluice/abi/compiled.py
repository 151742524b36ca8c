"""`CompiledModule` and `CompiledComponent`: a validated, compiled proxy-wasm module or component,
ready to instantiate (made by `Runtime.compile`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import wasmtime
import wasmtime.component


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


@dataclasses.dataclass(frozen=True)
class CompiledComponent:
    """A validated, compiled WASI 0.2 component of the `sluice:filter` world (made by
    `Runtime.compile`; see component.py)."""

    path: Path
    sha256: str
    size: int
    abi_version: str
    component: wasmtime.component.Component
    wasi: bool
    """Whether it imports WASI 0.2 interfaces (then it is linked with the restricted WASI)."""
    compile_seconds: float
    from_cache: bool


CompiledFilter = CompiledModule | CompiledComponent
"""What `Runtime.compile` returns: a proxy-wasm module or a component, told apart by the binary."""
