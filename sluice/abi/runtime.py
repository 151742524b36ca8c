"""`Runtime`: one per process. Owns the wasmtime engine, the epoch ticker, the linker with every
host function, the on-disk cache of compiled code, and the process's shared data and queues."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

import wasmtime

from . import fastcall
from .api import Host, PluginLoadError, PluginSpec
from .compiled import CompiledModule
from .fastcall import summarize_error
from .hostcalls import HOST_FUNCTIONS, bind_host_functions
from .plugin import Plugin
from .shared import InMemorySharedData, Queues, SharedData, SharedQueues
from .vm import VMServices

__all__ = ["CompiledModule", "Runtime"]

ABI_MARKERS = {
    "proxy_abi_version_0_1_0": "0.1.0",
    "proxy_abi_version_0_2_0": "0.2.0",
    "proxy_abi_version_0_2_1": "0.2.1",
    "proxy_abi_version_0_2_100": "0.2.100",  # Higress: 0.2.1 plus the Redis calls (docs/abi.md)
}
WASM_MAGIC = b"\0asm"
CORE_VERSION = b"\x01\0\0\0"


def _wasmtime_version() -> str:
    try:
        return metadata.version("wasmtime")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


class Runtime:
    def __init__(
        self, cache_dir: Path | str | None = None, shared_data: SharedData | None = None, queues: Queues | None = None
    ) -> None:
        self.engine = fastcall.engine()
        self.linker = wasmtime.Linker(self.engine)
        fastcall.define_host_functions(self.linker, HOST_FUNCTIONS)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.queues: Queues = queues if queues is not None else SharedQueues()
        self._services = VMServices(
            self.engine, shared_data if shared_data is not None else InMemorySharedData(), self.queues,
            bind_host_functions,
        )
        self._cache_tag = f"wasmtime-{_wasmtime_version()}-{platform.machine()}"

    @property
    def shared_data(self) -> SharedData:
        return self._services.shared_data

    @shared_data.setter
    def shared_data(self, store: SharedData) -> None:
        """Plugins loaded from now on use `store` (those already loaded keep theirs)."""
        self._services = dataclasses.replace(self._services, shared_data=store)

    def close(self) -> None:
        """Nothing to release: the engine and its ticker are shared by the process."""

    # -- compiling ----------------------------------------------------------------------------
    def compile(self, path: Path | str) -> CompiledModule:
        """Validate and compile a module (CPU-heavy: call it off the event loop).

        Raises PluginLoadError naming the file and the reason.
        """
        path = Path(path)
        try:
            wasm = path.read_bytes()
        except OSError as exc:
            raise PluginLoadError(path, f"cannot read the file: {exc.strerror or exc}") from None
        if wasm[:4] != WASM_MAGIC:
            raise PluginLoadError(path, "not a WebAssembly module (the file does not start with \\0asm)")
        if wasm[4:8] != CORE_VERSION:
            raise PluginLoadError(
                path, "a WebAssembly component or unknown binary version; sluice runs proxy-wasm core modules"
            )
        digest = hashlib.sha256(wasm).hexdigest()
        started = time.perf_counter()
        module, from_cache = self._compile_cached(path, wasm, digest)
        elapsed = time.perf_counter() - started
        abi_version = None
        for export in module.exports:
            if export.name in ABI_MARKERS and isinstance(export.type, wasmtime.FuncType):
                abi_version = ABI_MARKERS[export.name]
                break
        if abi_version is None:
            raise PluginLoadError(
                path, "not a proxy-wasm module: no proxy_abi_version_0_1_0/0_2_0/0_2_1 export"
            )
        try:
            instance_pre = self.linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise PluginLoadError(path, f"cannot link: {summarize_error(str(exc))}") from None
        return CompiledModule(path, digest, len(wasm), abi_version, module, instance_pre, elapsed, from_cache)

    def _compile_cached(self, path: Path, wasm: bytes, digest: str) -> tuple[wasmtime.Module, bool]:
        cached = self.cache_dir / f"{digest}-{self._cache_tag}.cwasm" if self.cache_dir else None
        if cached is not None and cached.exists():
            try:
                return wasmtime.Module.deserialize_file(self.engine, str(cached)), True
            except wasmtime.WasmtimeError:
                cached.unlink(missing_ok=True)  # stale or corrupt: recompile below
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise PluginLoadError(path, f"invalid WebAssembly: {summarize_error(str(exc))}") from None
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
                with os.fdopen(fd, "wb") as out:
                    out.write(module.serialize())
                os.replace(tmp, cached)  # atomic: a concurrent reader never sees half a file
            except OSError:
                pass  # a read-only cache directory only costs compile time
        return module, False

    # -- loading ------------------------------------------------------------------------------
    def load(self, spec: PluginSpec, host: Host, module: CompiledModule | None = None) -> Plugin:
        """Instantiate a VM for `spec` and run its root context through vm_start and configure.

        Raises PluginLoadError (file + reason) when any step fails.
        """
        if module is None:
            module = self.compile(spec.module_path)
        return Plugin.start(self._services, module, spec, host)
