# edgec: `make demo` (synthesize, convert, parity, chat) and `make test` set everything up themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= $(abspath ../shared)
export TIKTOKEN_ENCODINGS_BASE ?= $(SHARED)/data

.PHONY: setup test demo lint bench clean

$(BIN)/edgec: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]' accelerate
	touch $(BIN)/edgec

setup: $(BIN)/edgec

test: setup
	$(BIN)/python -m pytest -x -q tests

lint: setup
	$(BIN)/ruff check edgec tests bench

demo: setup
	$(BIN)/python -m edgec.demo

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) .pytest_cache build out
