# Two commands: `make run` (embedded SQLite server with an admin and an agent command line)
# and `make test` (the whole suite; `make test-pg` runs it on a throwaway PostgreSQL).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BIND ?= 127.0.0.1:8000

.PHONY: run test test-pg lint bench bench-peers bench-load

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tether migrate --noinput -v0
	$(BIN)/tether bootstrap --bind $(BIND)
	exec $(BIN)/tether serve --bind $(BIND) --no-migrate

lint: $(STAMP)
	$(BIN)/ruff check src tests bench agent
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports --no-logo

test: $(STAMP) lint
	$(BIN)/pytest

# The same suite on PostgreSQL (tests/pgcluster.py); pytest arguments pass through: ARGS="-x".
test-pg: $(STAMP)
	$(BIN)/python tests/run_pg.py $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/dispatch.py
	$(BIN)/python bench/held_polls.py
	$(BIN)/python bench/check_status.py
	$(BIN)/python bench/fleet_page.py
	$(BIN)/python bench/fanout.py

# Tether beside Salt and Ansible (`true` on 1, 10 and 25 hosts); each tool in its own venv,
# built by the script on its first run (bench/peers/.venvs/).
bench-peers: $(STAMP)
	$(BIN)/python bench/peers/run.py

# The fleet under load (bench/load.py): `make bench-load LOAD_ARGS=--quick` for a smoke run,
# LOAD_ARGS="--agents 2000", "--postgres --server-workers 2" (a throwaway cluster), ...
LOAD_ARGS ?=
bench-load: $(STAMP)
	$(BIN)/python bench/load.py $(LOAD_ARGS)
