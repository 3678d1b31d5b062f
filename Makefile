# One command to set up and run the default benchmark (`make demo`), one to set up and run
# the checks CI runs (`make test`). pip, not uv: pip takes torch from the local wheels.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Trains the digits default and writes results-local/ (git-ignored), so a fresh clone trains;
# the committed evidence in results/ is written with an explicit --out results.
demo: install
	$(VENV)/bin/clbench run --out results-local

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q  # tiny test models: one thread avoids oversubscription
