# The two commands of the README, and the lint CI runs beside them.
# Everything installs into .venv from pyproject.toml on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast test-unit test-postgresql test-sqlite test-cluster lint django-suite

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	cd example && ../$(BIN)/python manage.py demo

# The suite in tiers and passes (README, "Tests"); which tests a pass runs is a marker:
#   test-unit        the unit tier (-m unit): no database, Redis or worker; seconds
#   test-postgresql  the service tier on PostgreSQL (DATABASE_URL, default
#                    postgres://postgres@127.0.0.1:5432/test): every test but the unit tier
#   test-sqlite      the tests whose behaviour differs by database (-m databases), on SQLite
#   test-cluster     the tests that touch ormbridge's Redis (-m redis), with that Redis a Redis
#                    Cluster of three masters the run starts on free ports of 127.0.0.1 (needs
#                    redis-server >= 7 and redis-cli); the broker stays a plain server
# The lint checks (-m lint) are make lint's, not the passes'.
PYTEST := $(BIN)/python -m pytest

test: test-unit test-postgresql test-sqlite test-cluster

# For local work: the unit tier, then PostgreSQL's pass.
test-fast: test-unit test-postgresql

test-unit: $(BIN)/.installed
	$(PYTEST) -m unit

test-postgresql: $(BIN)/.installed
	$(PYTEST) -m "not unit and not lint"

test-sqlite: $(BIN)/.installed
	DATABASE_URL=sqlite:// $(PYTEST) -m "databases and not unit and not lint"

test-cluster: $(BIN)/.installed
	ORMBRIDGE_TEST_REDIS_CLUSTER=1 $(PYTEST) -m "redis and not unit and not lint"

# Peer check: Django's own transactions/delete/delete_regress/many_to_many/signals tests,
# without and with ormbridge, on SQLite and PostgreSQL (docs/django-suite.md).
django-suite: $(BIN)/.installed
	$(BIN)/python tests/django_suite/run.py

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(PYTEST) -m lint

# The sdist and the wheel, into dist/, checked by twine as the package index would (README
# rendering, metadata). build and twine go into .venv here: they are not ormbridge's to need.
# Install the wheel with: pip install "dist/ormbridge-<version>-py3-none-any.whl[asgi]"
.PHONY: dist
dist:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "build>=1.2" "twine>=6"
	rm -rf dist build ormbridge.egg-info  # a stale egg-info would put its old file list back
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*
	@# Every tracked file of the package (static files, migrations, py.typed ...) is in the wheel.
	git ls-files ormbridge | $(BIN)/python -c 'import glob, sys, zipfile; \
	    wheel = set(zipfile.ZipFile(glob.glob("dist/*.whl")[0]).namelist()); \
	    missing = [f for f in sys.stdin.read().split() if f not in wheel]; \
	    sys.exit(f"not in the wheel: {missing}" if missing else print(len(wheel), "files in the wheel"))'
