"""The compiled parts of sluice, both optional Cython extensions of the fast-call layer:

* sluice/abi/_ticker.pyx: the epoch ticker thread (without it `sluice.abi.fastcall` falls back
  to a POSIX timer ticker);
* sluice/abi/_component_call.pyx: component calls and host functions with values lowered and
  lifted in C (without it `sluice.abi.fastcall_component` uses its pure-Python path).

Everything else is in pyproject.toml. Without a C compiler the build goes on without them.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension("sluice.abi._ticker", ["sluice/abi/_ticker.pyx"], optional=True),
            Extension("sluice.abi._component_call", ["sluice/abi/_component_call.pyx"], optional=True),
        ],
        compiler_directives={"language_level": "3"},
    ),
)
