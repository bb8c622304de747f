# One command each, on a fresh machine:
#   make demo   sets up .venv, fetches SmolLM2 + Rotten Tomatoes, classifies ROWS reviews on CPU
#   make test   sets up .venv, fetches the demo assets, runs lint and the whole test suite (what CI runs)
#   make test-fast  the tests that start no engine and no Ray cluster (under 2 minutes)
VENV ?= .venv
ROWS ?= 300
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint fmt
setup:
	bash scripts/setup.sh

demo: setup
	$(BIN)/turbo-batch demo --rows $(ROWS)

lint: setup
	$(BIN)/ruff check turbo_batch tests benchmarks
	$(BIN)/ruff format --check turbo_batch tests benchmarks

test: setup lint
	$(BIN)/turbo-batch fetch-demo
	$(BIN)/python -m pytest -q --durations=30

# Tests whose fixtures reach a real engine or Ray are marked slow by tests/conftest.py; TB_FAST_LANE
# makes a test that starts Ray by itself fail, so it gets marked instead of slowing this lane down.
test-fast: setup
	TB_FAST_LANE=1 $(BIN)/python -m pytest -q -m "not slow and not demo and not gpu" --durations=10

fmt: setup
	$(BIN)/ruff format turbo_batch tests benchmarks
	$(BIN)/ruff check --fix turbo_batch tests benchmarks
