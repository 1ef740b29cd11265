# mmreparam — the README's two commands are `make demo` and `make test`.
# Each bootstraps the pinned environment in .venv on first use (tools/bootstrap.sh).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: env env-compat test test-compat test-all lint docs demo bench clean-env

env:
	@bash tools/bootstrap.sh

# The default suite (what CI runs): unit, property and small end-to-end tests.
test: env
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The same suite on the older stack most OpenMMLab users have (requirements/compat.txt:
# torch 2.1.2, mmcv 2.1.0 built for it, numpy < 2), in its own venv and mmcv cache key.
COMPAT_VENV := .venv-torch2.1

# mmreparam is installed there from a copy (EDITABLE=0), and pytest runs from the venv's bin
# (not `python -m`, which would put the source tree first on sys.path).
env-compat:
	@VENV=$(CURDIR)/$(COMPAT_VENV) REQS=$(CURDIR)/requirements/compat.txt EDITABLE=0 DOCS=0 \
		bash tools/bootstrap.sh

test-compat: env-compat
	$(COMPAT_VENV)/bin/pytest tests $(PYTEST_ARGS)

# The one linter and import sorter (ruff.toml); CI runs it before the tests.
lint: env
	.venv/bin/ruff check .

# The documentation site (docs/en, Sphinx + myst-parser); CI runs it after the linter. Every
# warning is an error: a broken link or toctree entry, or a docstring that does not parse.
docs: env
	.venv/bin/sphinx-build -W --keep-going -b html docs/en docs/en/_build/html

# Everything, including the tests marked slow.
test-all: env
	$(PY) -m pytest tests -m "" $(PYTEST_ARGS)

clean-env:
	rm -rf .venv $(COMPAT_VENV)

# Train, fold and test an OREPA-R50 detector and segmentor on generated data (CPU).
demo: env
	$(PY) tools/demo.py

# Benchmarks of every registered block type (12.7 minutes for all seven on 2 idle CPU cores,
# 2026-12-06); writes docs/benchmark/benchmark.{md,png}.
bench: env
	$(PY) tools/benchmark.py --out docs/benchmark --repeats 3 --rounds 2
