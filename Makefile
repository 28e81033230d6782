# Two entry points: `make demo` (set up, train on the embedded digits, print test metrics) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint docs clean

demo: $(VENV)/.installed
	$(BIN)/imgclf demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

# docs/cli.md and docs/config.md, generated from the typer app and the config models (tests/test_docs.py checks them)
docs: $(VENV)/.installed
	$(BIN)/python scripts/generate_docs.py

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

# Two steps: litert-torch's tree (the tflite extra) caps typing-extensions below 4.13, and one resolution of
# everything at once backtracks for over 20 minutes; on top of the dev set, pip settles it in about 30 s.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,tflite]'
	touch $@

clean:
	rm -rf $(VENV) demo_data runs .pytest_cache
