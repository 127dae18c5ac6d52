# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt

.PHONY: demo test test-slow lint venv bench-venv clean

$(BIN)/activate-done: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $@

venv: $(BIN)/activate-done

demo: venv
	$(BIN)/unlearn demo --out demo-output

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# Peer libraries (kronfluence, dattri) for the side-by-side benchmark, under the same torch
# pin. kronfluence declares torchvision, but PyPI's torchvision does not load beside the CPU
# torch wheel (and breaks pytorch-lightning's import); neither peer imports it at run time.
bench-venv: venv
	$(PIP) -e '.[dev,bench]'
	$(BIN)/pip uninstall -y -q torchvision || true

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) demo-output
