# Two entry points: `make demo` (train on the built-in corpus on a 2x2 mesh, then generate) and
# `make test` (the whole suite). Both create or reuse .venv; re-running is cheap.
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/python -m pip
BASE = $(VENV)/.meshtron-base
TEST = $(VENV)/.meshtron-test
BENCH = $(VENV)/.meshtron-bench

.PHONY: demo test test-all test-faults bench bench-megatron lm-eval soak clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(BASE): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(TEST): $(BASE)
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

demo: $(BASE)
	$(VENV)/bin/meshtron train --mesh batch:2,model:2 --model gpt-mini --steps 600 --eval-every 200 --out runs/demo

test: $(TEST)
	$(VENV)/bin/python -m pytest -q

test-all: $(TEST)      # make test plus the slow cases (about 4 minutes more here)
	$(VENV)/bin/python -m pytest -q -m "not fault_matrix"

test-faults: $(TEST)   # every rank x phase x before/after the first checkpoint (25 minutes here)
	$(VENV)/bin/python -m pytest -q -m "fault_matrix or not fault_matrix" tests/test_faults.py

$(BENCH): $(TEST)
	$(PIP) install -q -c constraints.txt -e '.[test,bench]'
	touch $@

bench: $(BENCH)
	$(VENV)/bin/python bench/bench_comm.py
	$(VENV)/bin/python bench/bench_tp.py
	$(VENV)/bin/python bench/bench_generate.py
	$(VENV)/bin/python bench/bench_planner.py

bench-megatron: $(BENCH)   # Megatron-Core's own tensor-parallel layers as the peer (an optional extra)
	$(PIP) install -q --no-deps megatron-core==0.16.1
	$(VENV)/bin/python bench/bench_megatron.py

lm-eval: $(TEST)
	$(VENV)/bin/python bench/lm_eval_serve.py

soak: $(TEST)
	$(PIP) install -q -c constraints.txt -e '.[soak]'
	$(VENV)/bin/python bench/soak_server.py

clean:
	rm -rf $(VENV) runs
