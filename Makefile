# Every target creates or reuses .venv: the CPU build of torch goes in first (pinned: an unpinned
# torch pulls a multi-GB CUDA build), then the project with its ranges.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kat-diag-installed

.PHONY: install demo test lint bench world

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The study's quick profile (kat-diag study): 5 methods, results.md / results.json / figures in runs/demo.
demo: $(STAMP)
	$(VENV)/bin/kat-diag study --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check kat_diag cli tests benchmarks examples
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check kat_diag cli tests benchmarks examples

world: $(STAMP)
	$(VENV)/bin/kat-diag world build

bench: $(STAMP)
	$(PY) benchmarks/detector.py
	$(PY) benchmarks/traces.py
	$(PY) benchmarks/rollout.py
