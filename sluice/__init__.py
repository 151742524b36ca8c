"""sluice: an edge and sidecar reverse proxy that runs every request through proxy-wasm filters.

Layers (docs/architecture.md): `sluice.abi` is the proxy-wasm host on wasmtime and knows nothing
of HTTP servers; `sluice.proxy` serves HTTP and talks to the host only through the names in
`sluice.abi.__all__`. `sluice.filters` (the built-in filters) and `sluice.config` (the default
configuration) are data shipped with the package.

Nothing is imported here, so `import sluice.proxy.config` stays cheap.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

__all__ = ["AB_FILTER", "BUILTIN_FILTERS_DIR", "DEMO_CONFIG", "BuiltinFilter", "__version__"]

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent

BUILTIN_FILTERS_DIR = _HERE / "filters"
"""The built-in filters (auth.wasm, ratelimit.wasm, ab.wasm), shipped in the wheel."""

DEMO_CONFIG = _HERE / "config" / "sluice.yaml"
"""The default configuration (the demo); `sluice config-path` prints it."""


@dataclasses.dataclass(frozen=True)
class BuiltinFilter:
    """What the proxy knows about one built-in filter (its docs: sluice/filters/README.md)."""

    module: str
    """Its file in `BUILTIN_FILTERS_DIR`; a chain entry whose `module` has this file name is it."""
    header_key: str
    """The key of its config that names the request header it writes."""
    default_header: str
    """The header it writes when its config names none."""


AB_FILTER = BuiltinFilter(module="ab.wasm", header_key="header", default_header="x-variant")
"""The A/B filter: it writes the chosen variant to a request header, which the access log reports."""
