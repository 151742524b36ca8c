"""The one compiled part of sluice: the epoch ticker thread (sluice/abi/_ticker.pyx).

Everything else is in pyproject.toml. The extension is optional: without a C compiler the build
goes on and `sluice.abi.fastcall` falls back to a POSIX timer ticker.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("sluice.abi._ticker", ["sluice/abi/_ticker.pyx"], optional=True)],
        compiler_directives={"language_level": "3"},
    ),
)
