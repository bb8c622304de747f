# One command each, on a fresh machine:
#   make demo   sets up .venv, fetches SmolLM2 + Rotten Tomatoes, classifies ROWS reviews on CPU
#   make test   sets up .venv, fetches the demo assets, runs lint and the whole test suite
VENV ?= .venv
ROWS ?= 300
BIN := $(VENV)/bin

.PHONY: setup demo test lint fmt
setup:
	bash scripts/setup.sh

demo: setup
	$(BIN)/turbo-batch demo --rows $(ROWS)

lint: setup
	$(BIN)/ruff check turbo_batch tests benchmarks
	$(BIN)/ruff format --check turbo_batch tests benchmarks

test: setup lint
	$(BIN)/turbo-batch fetch-demo
	$(BIN)/python -m pytest -q --durations=15

fmt: setup
	$(BIN)/ruff format turbo_batch tests benchmarks
	$(BIN)/ruff check --fix turbo_batch tests benchmarks
