# The two commands of the README: `make run` (the main job) and `make test`.
VENV ?= .venv
BUDGET ?= 50
ARGS ?=

.PHONY: setup run test test-slow lint bench clean

setup:
	@scripts/setup.sh

run: setup
	$(VENV)/bin/tdsearch --budget $(BUDGET) $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q -m "not slow" $(ARGS)

test-slow: setup
	$(VENV)/bin/python -m pytest -q -m "slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf tdsearch-runs mlflow.db mlruns .pytest_cache
