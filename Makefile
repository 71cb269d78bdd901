# semray: the two set-up commands the README promises are `make demo` and `make test`.
# Both create ./.venv on first use (torch pinned to the CPU wheel; a GPU user installs their own torch
# into the venv first) and reuse it afterwards.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.semray-installed
# Pinned so pip takes the CPU wheel instead of a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-browser demo test test-fast test-tune-e2e lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Debian's Chromium for the web-page tests (Playwright drives it; `playwright install` cannot download here).
install-browser:
	@test -x /usr/bin/chromium || { (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || { echo "install Debian's chromium (apt-get install chromium) to run the web-page tests"; exit 1; }; }

## Main job on the embedded defaults (semray demo): local Ray, the local MLflow store (~/.semray, or
## SEMRAY_HOME), shipped model; synth -> search -> register -> denoise a lot -> evaluate.
demo: install
	$(BIN)/semray demo --out outputs/demo

## The full test suite (what CI runs): everything, then the job-submission end-to-end tests (Tune search, adapt; own Ray head each).
test: install install-browser
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q -m tune_e2e tests/test_tune.py
	$(BIN)/python -m pytest -q -m tune_e2e tests/test_adapt.py

## The job-submission end-to-end tests (own Ray head each; several minutes): the Tune search, then adapt.
test-tune-e2e: install
	$(BIN)/python -m pytest -q -m tune_e2e tests/test_tune.py
	$(BIN)/python -m pytest -q -m tune_e2e tests/test_adapt.py

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not tune_e2e" tests

lint: install
	$(BIN)/ruff check semray tests jobs benchmarks
	$(BIN)/ruff format --check semray tests jobs benchmarks

format: install
	$(BIN)/ruff format semray tests jobs benchmarks
	$(BIN)/ruff check --fix semray tests jobs benchmarks

bench: install
	$(BIN)/python benchmarks/bench_noise.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
