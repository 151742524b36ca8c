"""sluice: an edge and sidecar reverse proxy that runs every request through proxy-wasm filters.

Layers (docs/architecture.md): `sluice.abi` is the proxy-wasm host on wasmtime and knows nothing
of HTTP servers; `sluice.proxy` serves HTTP and talks to the host only through the names in
`sluice.abi.__all__`. `sluice.filters` (the built-in filters) and `sluice.config` (the default
configuration) are data shipped with the package.

Nothing is imported here, so `import sluice.proxy.config` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUILTIN_FILTERS_DIR", "DEMO_CONFIG", "__version__"]

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent

BUILTIN_FILTERS_DIR = _HERE / "filters"
"""The built-in filters (auth.wasm, ratelimit.wasm, ab.wasm), shipped in the wheel."""

DEMO_CONFIG = _HERE / "config" / "sluice.yaml"
"""The default configuration (the demo); `sluice config-path` prints it."""
