# revacnn: make demo | make test | make bench | make lint
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STORE ?= store/demo
PYTHON ?= python3

.PHONY: install demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/revacnn demo --store $(STORE)

test: $(STAMP)  # includes tests/test_import_contract.py (lint-imports)
	$(PY) -m pytest -q --durations=20

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check revacnn apps tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
