# mmreparam — the README's two commands are `make demo` and `make test`.
# Each bootstraps the pinned environment in .venv on first use (tools/bootstrap.sh).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: env test test-all lint demo bench clean-env

env:
	@bash tools/bootstrap.sh

# The default suite (what CI runs): unit, property and small end-to-end tests.
test: env
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The one linter and import sorter (ruff.toml); CI runs it before the tests.
lint: env
	.venv/bin/ruff check .

# Everything, including the tests marked slow.
test-all: env
	$(PY) -m pytest tests -m "" $(PYTEST_ARGS)

clean-env:
	rm -rf .venv

# Train, fold and test an OREPA-R50 detector and segmentor on generated data (CPU).
demo: env
	$(PY) tools/demo.py

# Benchmarks (about 10 minutes on 2 CPU cores); writes docs/benchmark/benchmark.{md,png}.
bench: env
	$(PY) tools/benchmark.py --out docs/benchmark --repeats 3 --rounds 2
