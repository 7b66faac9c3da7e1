# Every target creates or reuses .venv: the CPU build of torch goes in first (pinned: an unpinned
# torch pulls a multi-GB CUDA build), then the project with its ranges.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kat-diag-installed

.PHONY: install demo test lint bench world figures figures-draw

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The study's quick profile (kat-diag study): 6 methods (OPD, KAT, IW-OPD, random, prefix, KAT + prefix), results.md / results.json / figures in runs/demo.
demo: $(STAMP)
	$(VENV)/bin/kat-diag study --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check kat_diag cli tests benchmarks examples
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check kat_diag cli tests benchmarks examples

world: $(STAMP)
	$(VENV)/bin/kat-diag world build --force

bench: $(STAMP)
	$(PY) benchmarks/detector.py
	$(PY) benchmarks/traces.py
	$(PY) benchmarks/rollout.py

# figures/: two runs on the committed world (plain OPD, and KAT with the default preset), same seed and
# steps, each evaluated before training (the eval curves' baseline) and every 50 steps; then every figure
# of both and the study's headline figure from FIG_STUDY (docs/diagnostics.md). FIG_STEPS=50 for a quick
# look; `make figures-draw` redraws from the existing runs without training.
FIG_STEPS ?= 200
FIG_STUDY ?= figures/study/results.json
figures: $(STAMP)
	rm -rf runs/fig_opd runs/fig_kat
	$(VENV)/bin/kat-diag train --termination none --steps $(FIG_STEPS) --eval-every 50 --eval-at-start --out runs/fig_opd
	$(VENV)/bin/kat-diag train --termination kat --steps $(FIG_STEPS) --eval-every 50 --eval-at-start --out runs/fig_kat
	$(MAKE) figures-draw

figures-draw: $(STAMP)
	rm -rf figures/fig_opd figures/fig_kat figures/curves.png figures/curves.csv figures/study.png \
		figures/study_figure.json figures/summary.md  # not figures/study (the study's own)
	$(VENV)/bin/kat-diag figures runs/fig_opd runs/fig_kat --out figures --study $(FIG_STUDY)
