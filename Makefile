# eqrecon: `make train` trains the demo preset end to end; `make test` runs the test suite.
# Both create the virtual environment on first use (.venv, the project installed editable).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.eqrecon-installed

.PHONY: setup test

setup: $(STAMP)

# Re-install only when the package metadata changed; otherwise `make setup` is a no-op.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q
