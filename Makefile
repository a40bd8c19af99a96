# One-command set-up: `make run` serves, `make test` runs the suite. Both are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The build script prints the cached binary's path (building it once if needed).
LLAMA := $${LLAMA_SERVER_PATH:-$$($(PY) scripts/build_llama_server.py)}

.PHONY: setup run test fuzz lint format bench models llama-server mcp-servers clean-data test-tools vendor-web

setup: $(VENV)/.installed models llama-server

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

models: $(VENV)/.installed
	$(PY) scripts/fetch_models.py

llama-server: $(VENV)/.installed
	@$(PY) scripts/build_llama_server.py

# Real MCP servers from npm for the tests, exactly as pinned in the committed lock file.
MCP_SERVERS := tests/mcp_servers
mcp-servers: $(MCP_SERVERS)/node_modules/.package-lock.json

$(MCP_SERVERS)/node_modules/.package-lock.json: $(MCP_SERVERS)/package.json $(MCP_SERVERS)/package-lock.json
	npm ci --prefix $(MCP_SERVERS) --no-audit --no-fund

run: setup
	LLAMA_SERVER_PATH="$(LLAMA)" $(PY) ai_server.py

# What the tests run besides Python: Debian's chromium (the web page's tests) and the
# openssl CLI (a self-signed certificate for the relay's https test). As root (CI) they
# are installed when missing; anyone else is told how, and `make run` never needs them.
test-tools:
	@command -v chromium >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium openssl; \
	  else \
	    echo "make: the tests need chromium and openssl: sudo apt-get install chromium openssl" >&2; \
	  fi; }

test: setup test-tools mcp-servers
	LLAMA_SERVER_PATH="$(LLAMA)" $(PY) -m pytest -q

# The API fuzzed from its OpenAPI schema against a real gateway (also part of `make test`).
fuzz: setup
	LLAMA_SERVER_PATH="$(LLAMA)" $(PY) -m pytest -q tests/test_fuzz.py

# The web page's libraries, from npm at the versions pinned in the script.
vendor-web: $(VENV)/.installed
	$(PY) scripts/vendor_web.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	LLAMA_SERVER_PATH="$(LLAMA)" $(PY) -m ailab.bench.gateway $(BENCH_ARGS)
