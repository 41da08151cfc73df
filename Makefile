# The two commands of the README, and the lint CI runs beside them.
# Everything installs into .venv from pyproject.toml on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	cd example && ../$(BIN)/python manage.py demo

# The suite runs on PostgreSQL (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test),
# then again on SQLite.
test: $(BIN)/.installed
	$(BIN)/python -m pytest
	DATABASE_URL=sqlite:// $(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
