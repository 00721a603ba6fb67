# Two commands on a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: demo test install install-test lint bench clean lock

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is needed")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# DEMO_ARGS="--port 8080 --emulator-port 8180" runs it on other ports.
demo: $(VENV)/.installed
	$(BIN)/salesmsg-connect demo $(DEMO_ARGS)

test: $(VENV)/.installed-test
	./scripts/ensure-chromium.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Regenerate the lock (constraints.txt) after changing pins in pyproject.toml.
lock: $(BIN)/python
	$(PIP) install -q -e '.[test,bench]'
	$(PIP) freeze --exclude-editable | grep -v '^-e ' > constraints.txt

clean:
	rm -rf $(VENV) var .pytest_cache

# Benchmarks on loopback (PostgreSQL as for the tests; wrk and nginx are apt-get installed when
# missing): one table on stdout, var/bench/latest.json. BENCH_SECONDS, BENCH_ROUNDS: bench/README.md.
bench: $(VENV)/.installed-test
	$(PIP) install -q -c constraints.txt -e '.[bench]'
	$(BIN)/python -m bench

# ruff (pyflakes and import order), import-linter (the layers in pyproject.toml), mypy (app and the emulator)
lint: $(VENV)/.installed-test
	$(BIN)/ruff check app salesmsg_emulator tests bench migrations
	$(BIN)/lint-imports
	$(BIN)/mypy
