# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-slow test-all lint typecheck format clean venv

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/bayesfilter-diff validate --out validation/demo

# the fast tier (a few minutes on 2 cores); the slow tier: statistical convergence checks,
# notebooks, process-kill resumes. CI runs both, the linter and the type checker.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -q

typecheck: $(BIN)/.installed
	$(BIN)/mypy

lint: $(BIN)/.installed
	$(BIN)/ruff format --check . && $(BIN)/ruff check .

format: $(BIN)/.installed
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV)
