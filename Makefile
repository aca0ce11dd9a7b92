# tauflow: every stage is a make target taking MANIFEST= and ARGS=.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MANIFEST ?= manifests/demo.yaml
ARGS ?=
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
TAUFLOW := $(VENV)/bin/tauflow
STAGES := validate generate score threshold pair train eval run

.PHONY: install demo world test bench study rounds-study inspect regenerate $(STAGES)

install: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@rm -f $(VENV)/.installed-*; touch $@

demo: $(STAMP)
	$(TAUFLOW) world runs/world
	$(TAUFLOW) run manifests/demo.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile $(ARGS)  # one worker per core; a test file stays on one worker

bench: $(STAMP)
	$(PY) -m benchmarks $(ARGS)

study: $(STAMP)   # the method study (benchmarks/study.py): about an hour on 2 cores; smaller: ARGS="--seeds 3 --ablation-seeds 1"
	$(PY) -m benchmarks.study $(ARGS)

rounds-study: $(STAMP)   # needs the world: make world
	$(PY) -m benchmarks.rounds_study $(ARGS)

$(STAGES): $(STAMP)
	$(TAUFLOW) $@ $(MANIFEST) $(ARGS)

world: $(STAMP)
	$(TAUFLOW) world runs/world $(ARGS)

inspect regenerate: $(STAMP)
	$(TAUFLOW) $@ $(ARGS)
