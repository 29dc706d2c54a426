# edgec: `make demo` (synthesize, convert, parity, chat) and `make test` set everything up themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED ?= $(abspath ../shared)
export TIKTOKEN_ENCODINGS_BASE ?= $(SHARED)/data

.PHONY: setup test test-float demo lint bench clean gpu-wheels gpu-check gpu-check-dry

$(BIN)/edgec: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]' accelerate
	touch $(BIN)/edgec

setup: $(BIN)/edgec edgec/web/node_modules/.package-lock.json

# the browser room's JavaScript (onnxruntime-web, pinned in edgec/web/package-lock.json) for edgec web / parity --browser
edgec/web/node_modules/.package-lock.json: edgec/web/package-lock.json
	npm ci --prefix edgec/web --no-audit --no-fund

# no -x: one red run shows every failure
test: setup
	$(BIN)/python -m pytest -q tests

# the float-sensitive tests again on an older OpenBLAS kernel (another blocking and vector width): a tolerance tuned
# to one kernel fails here (README "Tolerances"); FLOAT_CORETYPE=Sandybridge etc. for another
FLOAT_CORETYPE ?= Haswell
test-float: setup
	OPENBLAS_CORETYPE=$(FLOAT_CORETYPE) $(BIN)/python -m pytest -q -m float_sensitive tests

lint: setup
	$(BIN)/ruff check edgec tests bench

demo: setup
	$(BIN)/python -m edgec.demo

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/bench.py

# GPU check (bench/gpu_check.py, README "GPU check"). gpu-wheels: here, fetch the CUDA wheels and cut them into
# parts for the device tool; gpu-check: on the lent GPU machine, with its image's python3 (no venv: it reaches no
# registry); gpu-check-dry: the CPU dry run the test suite also runs.
gpu-wheels: setup
	$(BIN)/python bench/gpu_check.py prepare

gpu-check:
	PYTHONUNBUFFERED=1 $(PY) bench/gpu_check.py run $(GPU_CHECK_ARGS)

gpu-check-dry: setup
	$(BIN)/python bench/gpu_check.py run --dry-run --out out/gpu-check-dry $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build out
