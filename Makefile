# Developer entry points. Only `python3` (3.11+) and make are needed up front: every
# target that runs project code first builds .venv from the pinned requirements.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful install; older than a requirements file => install again.
STAMP := $(VENV)/.requirements-installed
PIP_FLAGS := --disable-pip-version-check --no-input --progress-bar off --quiet

# mypy refuses a directory with no Python files, and migrations/ starts out empty.
MYPY_TARGETS := service $(if $(wildcard migrations/*.py),migrations)

SEEDS ?= 200
BENCH_HOST ?= http://127.0.0.1:8001
BENCH_USERS ?= 50
BENCH_SPAWN_RATE ?= 10
BENCH_TIME ?= 30s

.DEFAULT_GOAL := help
.PHONY: help venv run test lint typecheck sim bench docs clean distclean

help:
	@echo "make venv        create .venv and install requirements-dev.txt (only when changed)"
	@echo "make run         start a local 3-node cluster on ports 8001-8003 (Ctrl-C stops it)"
	@echo "make test        lint + typecheck + pytest (what CI runs)"
	@echo "make lint        ruff"
	@echo "make typecheck   mypy (strict)"
	@echo "make sim SEEDS=N Raft simulation over N seeds (default $(SEEDS))"
	@echo "make bench       locust load test against a running cluster (BENCH_HOST=$(BENCH_HOST))"
	@echo "make docs        regenerate docs/configuration.md from service/config.py"
	@echo "make clean       remove caches; make distclean also removes .venv and ./data"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dsync needs Python 3.11+, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install $(PIP_FLAGS) -r requirements-dev.txt
	touch $@

venv: $(STAMP)

run: venv
	$(BIN)/python -m service cluster up --nodes 3

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy $(MYPY_TARGETS)

test: lint typecheck
	$(BIN)/pytest -q

sim: venv
	DSYNC_SIM_SEEDS=$(SEEDS) $(BIN)/pytest -q tests/sim

# Needs a running cluster (`make run` in another terminal).
bench: venv
	@test -f benchmarks/locustfile.py || { echo "benchmarks/locustfile.py is missing" >&2; exit 1; }
	$(BIN)/locust -f benchmarks/locustfile.py --headless --only-summary \
		--host $(BENCH_HOST) -u $(BENCH_USERS) -r $(BENCH_SPAWN_RATE) -t $(BENCH_TIME)

docs: venv
	$(BIN)/python -m service.config > docs/configuration.md.tmp
	mv docs/configuration.md.tmp docs/configuration.md

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

# ./data holds the local cluster's state (Redis AOF files), so only distclean removes it.
distclean: clean
	rm -rf $(VENV) data
