"""The compiled parts of sluice, built by `pip install` with the machine's C compiler (Cython is a
build requirement in pyproject.toml; everything else is there too):

* `sluice.abi._fastcall` — calls into wasm, host-function trampolines and linear memory on
  wasmtime's C API (`_fastcall.pyx`, C declarations in `_wasmtime.pxd`). Required: the fast-call
  layer `sluice.abi.fastcall` is built on it.
* `sluice.abi._ticker` — the epoch ticker thread. Optional: without it `fastcall` falls back to a
  POSIX timer ticker.
* `sluice.abi._component_call` — component calls and host functions with values lowered and
  lifted in C. Optional: without it `sluice.abi.fastcall_component` uses its pure-Python path.

None links against wasmtime: the fast-call modules hand them the addresses of its C entry points.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension("sluice.abi._fastcall", ["sluice/abi/_fastcall.pyx"]),
            Extension("sluice.abi._ticker", ["sluice/abi/_ticker.pyx"], optional=True),
            Extension("sluice.abi._component_call", ["sluice/abi/_component_call.pyx"], optional=True),
        ],
        compiler_directives={"language_level": "3"},
    ),
)
