# The two commands a newcomer needs (see README.md):
#   make demo   sluice with its built-in filters in front of a demo upstream, with lines to try
#   make test   the whole test suite
# Both create .venv and install sluice into it on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint check-built bench fuzz

# setup.py and the .pyx files too: the compiled parts of the fast-call layer are built by the install.
$(VENV)/.installed: pyproject.toml setup.py sluice/abi/_ticker.pyx sluice/abi/_component_call.pyx sluice/abi/_component_capi.pxd
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,build]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports  # the layering: contracts in pyproject.toml, docs/architecture.md

# The committed .wasm files must be what their sources build to (needs Node.js/npm for the
# AssemblyScript ones; the Zig toolchain comes from PyPI).
check-built: $(VENV)/.installed
	$(PY) sluice/filters/build.py --check
	$(PY) tests/fixtures/as/build.py --check
	$(PY) tests/fixtures/as/build.py --project examples/assemblyscript --check
	$(PY) tests/fixtures/components/build.py --check
	$(PY) examples/component-zig/build.py --check

bench: $(VENV)/.installed
	$(PY) bench/bench_abi.py
	$(PY) bench/bench_proxy.py

# Coverage-guided fuzzing (atheris), each target for a bounded time: no input may crash sluice or
# raise anything but its own errors. CI runs this too.
FUZZ_SECONDS ?= 45
fuzz: $(VENV)/.installed
	@for target in fuzz/fuzz_*.py; do echo "== $$target ($(FUZZ_SECONDS) s)"; out=$$(mktemp); \
	  $(PY) $$target -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 >$$out 2>&1; rc=$$?; \
	  tail -5 $$out; rm -f $$out; [ $$rc -eq 0 ] || exit $$rc; done
