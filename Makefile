# sisy-celery: `make demo` and `make test` set up everything they need in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest
# Branch coverage of each module of the package, printed by the unit passes.
COVERAGE := --cov=sisy_celery --cov-branch --cov-report=term-missing

.PHONY: install demo test test-unit test-postgres test-e2e mutation bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python example/demo.py

# Unit tests on SQLite, the same suite on PostgreSQL, then real worker/beat processes.
test: install test-unit test-postgres test-e2e

test-unit: install
	$(PYTEST) -m "not e2e and not browser" $(COVERAGE)

test-postgres: install
	SISY_TEST_DB=postgres $(PYTEST) -m "not e2e and not browser" $(COVERAGE)

test-e2e: install
	$(PYTEST) -m "e2e or browser"

# Mutation testing (slow, not part of make test): mutmut mutates each module of MUTATE and runs
# the process-free tests of MUTATION_TESTS against every mutant; prints the score per module and
# the surviving mutants. Runs in build/mutation, a scratch copy.
MUTATE := sisy_celery/schedules.py
MUTATION_TESTS := tests/test_schedules.py
MUTATION_JOBS ?= 2

mutation: install
	$(BIN)/python -m pip install -q "mutmut>=3.8,<4"
	$(BIN)/python tests/mutation.py $(MUTATE) --tests $(MUTATION_TESTS) --jobs $(MUTATION_JOBS)

bench: install
	$(BIN)/python -m pip install -q -r bench/requirements.txt
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) example/var artifacts .pytest_cache .hypothesis .coverage build/mutation
