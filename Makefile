# The two commands of the README: `make run` and `make test`. Everything else is set-up they share.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TINY := models/tiny
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1 || echo 0)

.PHONY: run demo test lint format install tiny clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first: a plain `torch` requirement would pull a CUDA build of several GB on CPU machines.
$(STAMP): pyproject.toml | $(BIN)/python
ifeq ($(HAS_CUDA),0)
	$(BIN)/pip install --quiet torch==2.13.0
endif
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/python -m internvl_core.model.cpu_kernels  # the C++ CPU attention kernel, once
	touch $(STAMP)

install: $(STAMP)

$(TINY)/config.json: | $(STAMP)
	$(BIN)/python -m internvl_core.testing.tiny --family qwen2 --out $(TINY)

tiny: $(TINY)/config.json

# Serves the tiny default model on 127.0.0.1:8000 (Ctrl-C stops it). Token auth off: local only.
# Ray's throughput mode (deployments/serve_env.py): the ingress replica also serves 127.0.0.1:30000.
SERVE_ENV := RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_LOG_TO_STDERR=1
run: $(STAMP) $(TINY)/config.json
	RAY_AUTH_MODE=disabled $(SERVE_ENV) $(BIN)/serve run serve_configs/tiny.yaml

demo: $(STAMP) $(TINY)/config.json
	$(BIN)/python -m internvl_core.demo --model $(TINY)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) models .pytest_cache
