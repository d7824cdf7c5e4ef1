# sisy-celery: `make demo` and `make test` set up everything they need in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest
# Branch coverage of each module of the package, printed by the unit passes.
COVERAGE := --cov=sisy_celery --cov-branch --cov-report=term-missing

# Other supported Python / Django pairs the unit suite runs on (SQLite), each in a venv of its own
# built from a pyenv build: PYTHON_VERSION/DJANGO_SERIES. Django 6.0 needs Python 3.12 or later.
PYENV_VERSIONS ?= $(HOME)/.pyenv/versions
MATRIX ?= 3.10.13/4.2 3.13.0/6.0

.PHONY: install demo test test-unit test-postgres test-e2e test-matrix mutation bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The demo needs the package alone: SQLite and kombu's filesystem broker come with Python and Celery.
# pip's output goes to a log, shown only if the install fails.
DEMO_STAMP := $(VENV)/.demo-stamp
$(DEMO_STAMP): pyproject.toml
	@echo "make demo: installing sisy-celery and its dependencies (no extras) into $(VENV)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q -e . > $(VENV)/demo-install.log 2>&1 \
	  || { cat $(VENV)/demo-install.log; exit 1; }
	@touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	@$(BIN)/python example/demo.py

# Unit tests on SQLite (here and on the other Python/Django pairs), the same suite on PostgreSQL,
# then real worker/beat processes.
test: install test-unit test-matrix test-postgres test-e2e

test-unit: install
	$(PYTEST) -m "not e2e and not browser" $(COVERAGE)

test-postgres: install
	SISY_TEST_DB=postgres $(PYTEST) -m "not e2e and not browser" $(COVERAGE)

test-matrix:
	@set -e; for pair in $(MATRIX); do \
	  version=$${pair%/*}; django=$${pair#*/}; venv=.venv-py$$version-django$$django; \
	  if [ ! -f $$venv/.installed-stamp ] || [ pyproject.toml -nt $$venv/.installed-stamp ]; then \
	    echo "test-matrix: creating $$venv (Python $$version from $(PYENV_VERSIONS), Django $$django.x, the test extra)"; \
	    test -x $(PYENV_VERSIONS)/$$version/bin/python \
	      || { echo "test-matrix: no Python $$version in $(PYENV_VERSIONS) (pyenv install $$version)"; exit 1; }; \
	    rm -rf $$venv; \
	    $(PYENV_VERSIONS)/$$version/bin/python -m venv $$venv; \
	    $$venv/bin/python -m pip install -q --upgrade pip; \
	    $$venv/bin/python -m pip install -q -e ".[test]" "Django~=$$django.0"; \
	    touch $$venv/.installed-stamp; \
	  fi; \
	  echo "test-matrix: unit suite on $$($$venv/bin/python -c 'import sys, django; print(f"Python {sys.version.split()[0]}, Django {django.__version__}")')"; \
	  $$venv/bin/python -m pytest -q -p no:cacheprovider -m "not e2e and not browser"; \
	done

test-e2e: install
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || echo "make test-e2e: the browser tests will \
	install Debian's chromium and chromium-driver packages with apt-get (they are missing)"
	$(PYTEST) -m "e2e or browser"

# Mutation testing (slow, not part of make test): mutmut mutates each module of MUTATE and runs
# the process-free tests of MUTATION_TESTS against every mutant; prints the score per module and
# the surviving mutants. Runs in build/mutation, a scratch copy.
MUTATE := sisy_celery/schedules.py sisy_celery/engine.py
MUTATION_TESTS := tests/test_schedules.py tests/test_engine.py tests/test_scheduler.py
MUTATION_JOBS ?= 2

mutation: install
	$(BIN)/python -m pip install -q "mutmut>=3.8,<4"
	$(BIN)/python tests/mutation.py $(MUTATE) --tests $(MUTATION_TESTS) --jobs $(MUTATION_JOBS)

bench: install
	$(BIN)/python -m pip install -q -r bench/requirements.txt
	$(BIN)/python bench/run.py
	$(BIN)/python bench/dispatch.py

clean:
	rm -rf $(VENV) .venv-py* example/var artifacts .pytest_cache .hypothesis .coverage build/mutation
