# Two entry points: `make demo` (set up, train on the embedded digits, print test metrics) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint docs clean

demo: $(VENV)/.installed
	$(BIN)/imgclf demo

test: $(VENV)/.installed-dev
	$(BIN)/lint-imports --no-cache
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

# The dev set (tests, the optional extras: ONNX, serving, tracking, tuning, TFLite) at the versions of
# .ci/dev-constraints.txt: litert-torch's tree caps typing-extensions below 4.13, which newer pydantic, mlflow and
# jupyter-client need, and an unconstrained resolution of everything backtracks for many minutes or fails.
$(VENV)/.installed-dev: $(VENV)/.installed .ci/dev-constraints.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c .ci/dev-constraints.txt -e '.[dev,tflite]'
	touch $@

clean:
	rm -rf $(VENV) demo_data runs .pytest_cache
