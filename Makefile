# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Pinned here, not in pyproject (where a floor is enough for users with their own CUDA builds):
# on the project's CPU machines these exact files come from local disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install lint typecheck test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -e '.[test]' $(TORCH_PINS)
	touch $(STAMP)

# ruff (configured in pyproject.toml): pyflakes, pycodestyle, import order, bugbear; and the formatter's check.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# mypy over d3hr_ray/ (configured in pyproject.toml, [tool.mypy]); every ignore carries its reason on its line.
typecheck: $(STAMP)
	$(PY) -m mypy

# The full suite, as CI runs it (.ci/run).
test: lint typecheck
	$(PY) -m pytest -q

# For iterating: the same checks and every test that starts no Ray (tests/conftest.py marks the others slow).
test-fast: lint typecheck
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m d3hr_ray.distill

bench: $(STAMP)
	$(PY) -m benchmarks selection

clean:
	rm -rf $(VENV) d3hr-output .pytest_cache .hypothesis
