# make demo | make test | make lint | make bench | make bench-quick | make soak MINUTES=30
# make explore MINUTES=N: the model-based test (tests/model) with fresh seeds for N minutes
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint pytest bench bench-quick soak explore clean apt-http apt-cli fuse

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Byte-compiled once, as a wheel's install would be: an editable install is not, and with
# PYTHONDONTWRITEBYTECODE set (as on our machines) every daemon start would compile ~60 modules
# again (~90 ms of CPU each time: tests, demo and bench start many daemons).
# The native pieces are compiled by the install (tools/hatch_build.py): again when they change.
$(STAMP): $(PY) pyproject.toml tools/hatch_build.py src/pubmon/_arm.c src/pubmon/_linecount.c
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m compileall -q src
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests use when present (Prometheus scrape test, headless-browser test):
# installed once, only where missing; without root or apt those tests skip and say why.
HTTP_TEST_APT := prometheus chromium chromium-driver
# The CLI's tests: man renders pubmon(1), zsh and bash load the completion scripts; the install
# test runs systemd/README.md's logrotate snippet.
CLI_TEST_APT := man-db groff-base zsh bash logrotate
apt-cli:
	@if ! command -v man >/dev/null || ! command -v zsh >/dev/null \
	    || ! command -v logrotate >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      --no-install-recommends $(CLI_TEST_APT); \
	  else \
	    echo "make: apt-get install $(CLI_TEST_APT) to run the man page and completion tests"; \
	  fi; \
	fi

apt-http:
	@if ! command -v prometheus >/dev/null || ! command -v chromium >/dev/null \
	    || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      --no-install-recommends $(HTTP_TEST_APT); \
	  else \
	    echo "make: apt-get install $(HTTP_TEST_APT) to run the Prometheus and browser tests"; \
	  fi; \
	fi

demo: $(STAMP)
	$(VENV)/bin/pubmon demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/ruff format --check src tests bench tools
	$(VENV)/bin/mypy --strict src
	$(VENV)/bin/lint-imports

# The log storage tests mount a FUSE file system of their own (mfusepy, from the test extras,
# loads libfuse3): install Debian's fuse3 once, when libfuse3 or fusermount3 is missing.
fuse:
	@if ! ldconfig -p | grep -q 'libfuse3\.so\.3' || ! command -v fusermount3 >/dev/null; then \
		echo "installing fuse3 (libfuse3, fusermount3) for the FUSE tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3; \
	fi

pytest: $(STAMP) apt-http apt-cli fuse
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint pytest

bench: $(STAMP)
	$(PY) bench/run.py
	$(PY) bench/bench_upgrade.py --sizes 200,1000 --runs 5
	$(PY) bench/bench_probe.py --n 1000 --repeat 1
	$(PY) bench/bench_scaling.py --n 100,1000,4000 --repeat 1

bench-quick: $(STAMP)
	$(PY) bench/run.py --quick

MINUTES ?= 30
soak: $(STAMP)
	PUBMON_CHAOS_SECONDS=$$(( $(MINUTES) * 60 )) $(PY) -m pytest -q -m chaos tests/chaos -s \
		-o faulthandler_timeout=0

# A failure prints the seed and the command that replays it (see tests/model/test_model.py).
explore: $(STAMP)
	PUBMON_MODEL_SECONDS=$$(( $(MINUTES) * 60 )) $(PY) -m pytest -q -s tests/model \
		-p no:cacheprovider -o faulthandler_timeout=0

clean:
	rm -rf $(VENV) build dist .mypy_cache .pytest_cache .ruff_cache
