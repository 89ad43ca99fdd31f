# The two commands of the README: `make run` (the main job) and `make test`.
VENV ?= .venv
BUDGET ?= 50
ARGS ?=

.PHONY: setup run test test-slow test-server lint bench clean

setup:
	@scripts/setup.sh

run: setup
	$(VENV)/bin/tdsearch --budget $(BUDGET) $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q -m "not slow and not server" $(ARGS)

test-slow: setup
	$(VENV)/bin/python -m pytest -q -m "slow and not server" $(ARGS)

# PostgreSQL + an MLflow server on loopback (scripts/tracking_servers.sh), the server tests
# against them, then both stopped.
SERVERS ?= /tmp/tdsearch-servers
test-server: setup
	TDSEARCH_REQUIRE_SERVERS=1 scripts/tracking_servers.sh run $(SERVERS) \
		$(VENV)/bin/python -m pytest -q -m server $(ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf tdsearch-runs mlflow.db mlruns .pytest_cache
