"""`Runtime`: one per process. Owns the wasmtime engine, the epoch ticker, the linker with every
host function, the on-disk cache of compiled code, and the process's shared data and queues."""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import time
from importlib import metadata
from pathlib import Path

import wasmtime

from . import diskcache, fastcall
from .api import Host, PluginLoadError, PluginSpec
from .compiled import CompiledComponent, CompiledFilter, CompiledModule
from .component import ComponentPlugin, compile_component, is_component
from .fastcall import summarize_error
from .hostcalls import HOST_FUNCTIONS, bind_host_functions
from .plugin import Plugin
from .shared import InMemorySharedData, Queues, SharedData, SharedQueues
from .types import LogLevel, WasmResult
from .vm import VMServices

__all__ = ["CompiledModule", "Filter", "Runtime"]

Filter = Plugin | ComponentPlugin
"""What `Runtime.load` returns: a proxy-wasm `Plugin` or a `ComponentPlugin`. Both offer the proxy
the same five things (`name`, `new_stream`, `report`, `set_log_level`, `retire`), so it never
needs to know which kind a filter is."""

ABI_MARKERS = {
    "proxy_abi_version_0_1_0": "0.1.0",
    "proxy_abi_version_0_2_0": "0.2.0",
    "proxy_abi_version_0_2_1": "0.2.1",
    # Higress: 0.2.1 plus proxy_get_log_level and its Redis calls (see hostcalls.py).
    "proxy_abi_version_0_2_100": "0.2.100",
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
        self._defined = frozenset((fn.module, fn.name) for fn in HOST_FUNCTIONS)
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
    def compile(self, path: Path | str) -> CompiledFilter:
        """Validate and compile a module or a component (CPU-heavy: call it off the event loop).

        Raises PluginLoadError naming the file and the reason.
        """
        path = Path(path)
        try:
            wasm = path.read_bytes()
        except OSError as exc:
            raise PluginLoadError(path, f"cannot read the file: {exc.strerror or exc}") from None
        if wasm[:4] != WASM_MAGIC:
            raise PluginLoadError(path, "not a WebAssembly module (the file does not start with \\0asm)")
        if is_component(wasm):
            return compile_component(self.engine, path, wasm, self.cache_dir, self._cache_tag)
        if wasm[4:8] != CORE_VERSION:
            raise PluginLoadError(
                path, "an unknown WebAssembly binary version (neither a core module nor a component)"
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
                path, "not a proxy-wasm module: no proxy_abi_version_0_1_0/0_2_0/0_2_1/0_2_100 export"
            )
        stubs = self._stubs_for(path, module)
        linker = self.linker if not stubs else self._linker_with(stubs)
        try:
            instance_pre = linker.instantiate_pre(module)
        except wasmtime.WasmtimeError as exc:
            raise PluginLoadError(path, f"cannot link: {summarize_error(str(exc))}") from None
        return CompiledModule(
            path, digest, len(wasm), abi_version, module, instance_pre, elapsed, from_cache,
            unknown_imports=tuple(fn.name for fn in stubs),
        )

    def _stubs_for(self, path: Path, module: wasmtime.Module) -> list[fastcall.HostFunction]:
        """The module's `env.proxy_*` function imports sluice does not define (to be linked to
        stubs answering UNIMPLEMENTED); raises PluginLoadError naming every other import sluice
        cannot provide."""
        stubs: list[fastcall.HostFunction] = []
        refused: list[str] = []
        for imp in module.imports:
            name = imp.name or ""
            if (imp.module, name) in self._defined:
                continue
            ty = imp.type
            label = f"{imp.module}.{name}"
            if not isinstance(ty, wasmtime.FuncType):
                refused.append(f"{label} (not a function)")
            elif imp.module != "env" or not name.startswith("proxy_"):
                refused.append(label)
            else:
                try:
                    params, results = fastcall.import_signature(ty)
                except ValueError as exc:
                    refused.append(f"{label} ({exc})")
                    continue
                stubs.append(fastcall.HostFunction("env", name, params, results))
        if refused:
            raise PluginLoadError(path, f"imports that sluice does not provide: {', '.join(refused)}")
        return stubs

    def _linker_with(self, stubs: list[fastcall.HostFunction]) -> wasmtime.Linker:
        """A linker for one module: every host function plus `stubs`, each answering
        UNIMPLEMENTED (i32 result) or zero (other results). The process-wide linker stays as it
        is, so no other module sees these names."""
        linker = wasmtime.Linker(self.engine)
        fastcall.define_host_functions(linker, HOST_FUNCTIONS)
        unimplemented = int(WasmResult.UNIMPLEMENTED)
        fastcall.define_constant_functions(
            linker, [(fn, unimplemented if fn.results == "i" else 0) for fn in stubs]
        )
        return linker

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
            diskcache.store(cached, module.serialize())
        return module, False

    # -- loading ------------------------------------------------------------------------------
    def load(
        self, spec: PluginSpec, host: Host, module: CompiledFilter | None = None
    ) -> Filter:
        """Instantiate a VM for `spec` and run its root context through vm_start and configure (for a
        component: instantiate it and call `configure`).

        Raises PluginLoadError (file + reason) when any step fails.
        """
        if module is None:
            module = self.compile(spec.module_path)
        if isinstance(module, CompiledComponent):
            return ComponentPlugin.start(self._services, module, spec, host)
        names = ", ".join(module.unknown_imports)
        if module.unknown_imports and spec.strict_imports:
            raise PluginLoadError(
                module.path, f"imports host calls sluice does not define (strict_imports is set): {names}"
            )
        plugin = Plugin.start(self._services, module, spec, host)
        if module.unknown_imports:
            host.log(
                spec.name, LogLevel.WARN,
                f"filter {spec.name}: host calls sluice does not define answer UNIMPLEMENTED: {names}",
            )
        return plugin
