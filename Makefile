# Two commands do all the set-up on a fresh machine with only python3 and make:
#   make demo   -> creates .venv on first use, installs, runs the loop on the embedded sandbox
#   make test   -> creates .venv if needed, runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench e2e ui lint format clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/optimizer demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m optimizer_assets.bench $(BENCH)

# end-to-end latency with the Dagster daemon: deal-stage change -> budget change applied
e2e: $(STAMP)
	$(BIN)/python -m optimizer_assets.bench e2e_latency

ui: $(STAMP)
	$(BIN)/optimizer ui

lint: $(STAMP)
	$(BIN)/ruff check optimizer_assets optimizer_tests
	$(BIN)/ruff format --check optimizer_assets optimizer_tests

format: $(STAMP)
	$(BIN)/ruff format optimizer_assets optimizer_tests
	$(BIN)/ruff check --fix optimizer_assets optimizer_tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
