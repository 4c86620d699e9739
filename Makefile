# Tessera: `make up` runs the whole system on SQLite; `make test` runs the tests.
# Both set themselves up (virtualenv, dependencies, generated stubs) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PROTOS := $(shell find protos -name '*.proto')
STUBS := tessera/common/v1/common_pb2.py tessera/activation/v1/activation_pb2.py \
         tessera/license/v1/license_pb2.py tessera/admin/v1/admin_pb2.py
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: up test protos lint check-stubs buf-lint bench clean

up: $(VENV)/.installed $(STUBS)
	$(PY) deploy/local/run.py

test: $(VENV)/.installed $(STUBS)
	$(PY) -m pytest $(PYTEST_ARGS)

# Load generator (docs/performance.md); e.g. make bench BENCH_ARGS="--phases echo,cycles".
bench: $(VENV)/.installed $(STUBS)
	$(PY) -m bench $(BENCH_ARGS)

protos $(STUBS) &: $(PROTOS) | $(VENV)/.installed
	$(call generate_stubs,.)

lint: $(VENV)/.installed $(STUBS) check-stubs buf-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Regenerate into a scratch directory and compare: stale stubs fail the lint.
check-stubs: $(VENV)/.installed
	@rm -rf .stubs-check && mkdir -p .stubs-check
	@$(call generate_stubs,.stubs-check)
	@for f in $$(cd .stubs-check && find tessera -name '*_pb2*'); do \
	  cmp -s .stubs-check/$$f $$f || { echo "stale generated stub: $$f (run: make protos)"; \
	  rm -rf .stubs-check; exit 1; }; done
	@rm -rf .stubs-check
	@echo "generated stubs are up to date"

buf-lint: $(BUF)
	$(BUF) lint protos

$(BUF):
	npm install --no-audit --no-fund --silent --prefix .tools @bufbuild/buf@$(BUF_VERSION)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf var .tools .stubs-check .mypy_cache .ruff_cache .pytest_cache
	find tessera -name '*_pb2*' -delete

define generate_stubs
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	  --python_out=$(1) --grpc_python_out=$(1) --mypy_out=$(1) --mypy_grpc_out=$(1) \
	  $(PROTOS) > /dev/null
endef
