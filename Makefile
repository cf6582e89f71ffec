# make demo | make test | make lint | make bench | make bench-quick | make soak MINUTES=30
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint pytest bench bench-quick soak clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pubmon demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy --strict src

pytest: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint pytest

bench: $(STAMP)
	$(PY) bench/run.py

bench-quick: $(STAMP)
	$(PY) bench/run.py --quick

MINUTES ?= 30
soak: $(STAMP)
	PUBMON_CHAOS_SECONDS=$$(( $(MINUTES) * 60 )) $(PY) -m pytest -q -m chaos tests/chaos -s \
		-o faulthandler_timeout=0

clean:
	rm -rf $(VENV) build dist .mypy_cache .pytest_cache .ruff_cache
