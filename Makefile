# Tessera: `make up` runs the whole system on SQLite; `make test` runs the tests.
# Both set themselves up (virtualenv, dependencies, generated stubs) on first use, from
# the locks: uv.lock (Python), tools/uv-requirements.txt (uv itself, hash-pinned) and
# tools/package-lock.json (buf). Nothing is resolved afresh; `make upgrade` re-resolves.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PROTOS := $(shell find protos -name '*.proto')
STUBS := tessera/common/v1/common_pb2.py tessera/activation/v1/activation_pb2.py \
         tessera/license/v1/license_pb2.py tessera/admin/v1/admin_pb2.py
BUF := tools/node_modules/.bin/buf
UV := tools/.venv/bin/uv
# uv uses the Python named above and never downloads one of its own.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: up test protos lint check-stubs check-lock buf-lint buf-breaking bench upgrade clean

up: $(VENV)/.installed $(STUBS)
	$(PY) deploy/local/run.py

test: $(VENV)/.installed $(STUBS)
	$(PY) -m pytest $(PYTEST_ARGS)

# Load generator (docs/performance.md); e.g. make bench BENCH_ARGS="--phases echo,cycles".
bench: $(VENV)/.installed $(STUBS)
	$(PY) -m bench $(BENCH_ARGS)

protos $(STUBS) &: $(PROTOS) | $(VENV)/.installed
	$(call generate_stubs,.)

lint: $(VENV)/.installed $(STUBS) check-lock check-stubs buf-lint buf-breaking
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

# The lock is in date with pyproject.toml, and the stubs, the lock and the grpcio/protobuf
# floors of both distributions agree (tools/versions.py).
check-lock: $(UV) $(STUBS)
	$(UV) lock --check --quiet || { echo "uv.lock is out of date with pyproject.toml (run: make upgrade, or $(UV) lock)"; exit 1; }
	$(PY) tools/versions.py check

buf-lint: $(BUF)
	$(BUF) lint protos

# The contracts may not break what main serves (protos/buf.yaml: the FILE rules). buf
# reads main with `git clone file://$(CURDIR)/.git`, which git also accepts in a worktree,
# where .git is a file naming the real git directory. A clone of main, a shallow one and
# a worktree have the local branch main; a clone made from another branch has main only
# as origin/main, which buf finds as a ref (branch= names local branches only).
BREAKING_AGAINST = $(shell git rev-parse -q --verify refs/heads/main >/dev/null \
                     && echo branch=main || echo ref=origin/main)

buf-breaking: $(BUF)
	$(BUF) breaking protos --against '.git#$(BREAKING_AGAINST),subdir=protos'

$(BUF): tools/package.json tools/package-lock.json
	npm ci --no-audit --no-fund --silent --prefix tools
	touch $@

$(UV): tools/uv-requirements.txt
	test -x tools/.venv/bin/python || $(PYTHON) -m venv tools/.venv
	tools/.venv/bin/python -m pip install --quiet --no-deps --require-hashes -r $<
	touch $@

# Exactly the lock: --locked fails instead of re-resolving when uv.lock is out of date,
# and sync removes whatever the lock does not list. The project is built without build
# isolation, with the locked setuptools, so the first step installs everything else.
$(VENV)/.installed: pyproject.toml uv.lock $(UV)
	$(UV) sync --quiet --locked --no-install-project
	$(UV) sync --quiet --locked
	touch $@

# Re-resolve to the newest allowed versions, regenerate the stubs with the new
# grpcio-tools, derive the floors from them, and lock again (README, "Updating
# dependencies"). Then: make lint && make test, and commit uv.lock with the pyprojects.
upgrade: $(UV)
	$(UV) lock --upgrade
	npm update --no-audit --no-fund --silent --prefix tools
	$(UV) sync --quiet --locked --no-install-project
	$(UV) sync --quiet --locked
	$(call generate_stubs,.)
	$(PY) tools/versions.py write
	$(UV) lock
	$(UV) sync --quiet --locked
	touch $(VENV)/.installed
	$(PY) tools/versions.py check

clean:
	rm -rf var tools/.venv tools/node_modules .stubs-check .mypy_cache .ruff_cache .pytest_cache
	find tessera -name '*_pb2*' -delete

define generate_stubs
	PATH="$(CURDIR)/$(BIN):$$PATH" $(PY) -m grpc_tools.protoc -I protos \
	  --python_out=$(1) --grpc_python_out=$(1) --mypy_out=$(1) --mypy_grpc_out=$(1) \
	  $(PROTOS) > /dev/null
endef
