# The two commands a newcomer needs:
#   make demo   build the seed models, start backend + guard, show guarded outputs
#   make test   lint, type-check and run the whole test suite
# Both create .venv/ and install everything they need, Debian packages included.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
APT_STAMP := $(VENV)/.apt-installed
APT_PACKAGES := prometheus nginx nghttp2-client curl
DURATION ?= 300

.PHONY: venv apt demo test lint typecheck pytest bench bench-check bench-window fuzz fuzz-asan soak attack clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# guard.dataplane._rank and guard.dataplane._walk (guard/dataplane/*.c) are compiled by the install: a C
# compiler and Python's headers first, from Debian when missing. Without them
# the install would still succeed, on the slower pure-Python path alone
# (tests/dataplane/test_rank.py and tests/dataplane/test_walk.py fail).
$(STAMP): pyproject.toml setup.py guard/dataplane/_rank.c guard/dataplane/_walk.c | $(PY)
	@missing=""; \
	command -v cc >/dev/null || missing="gcc libc6-dev"; \
	$(PY) -c "import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" 2>/dev/null || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	$(PIP) install -q -e '.[test]'
	touch $@

venv: $(STAMP)

# Debian packages the tests and benchmarks use: promtool/prometheus,
# nginx (the grpc_pass anchor), h2load (nghttp2-client), curl (an independent
# HTTP client in the REST tests).
$(APT_STAMP): | $(PY)
	@missing=""; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v h2load >/dev/null || missing="$$missing nghttp2-client"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	touch $@

apt: $(APT_STAMP)

demo: $(STAMP)
	$(VENV)/bin/guard demo

lint: $(STAMP)
	$(VENV)/bin/ruff check guard tests bench deploy setup.py
	$(VENV)/bin/ruff format --check guard tests bench deploy setup.py

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) $(APT_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test: lint typecheck pytest

# The guard is measured with its bytecode compiled, as the image ships it (the
# checkout's is not written when PYTHONDONTWRITEBYTECODE is set, and sources
# compiled at every start cost RSS and startup time).
bench: $(STAMP) $(APT_STAMP)
	$(PY) -m compileall -q guard bench
	$(PY) -m bench.run

bench-check: $(STAMP)
	$(PY) -m bench.check

# What a fixed HTTP/2 stream window costs large requests from far away.
bench-window: $(STAMP)
	$(PY) -m bench.window --json window.json

fuzz: $(STAMP)
	$(PIP) install -q atheris
	$(PY) -m tests.fuzz.fuzz_wire -max_total_time=60
	$(PY) -m tests.fuzz.fuzz_rest -max_total_time=60

# The same targets against the native modules built with AddressSanitizer and
# UBSan (tests/fuzz/asan.py); crash files land in .cache/fuzz-asan/.
fuzz-asan: $(STAMP)
	$(PIP) install -q atheris
	$(PY) -m tests.fuzz.asan -max_total_time=300 -rss_limit_mb=4096

# Soak with hostile traffic in the background (bench/hostile.py).
soak: $(STAMP)
	$(PY) -m bench.soak --duration $(DURATION)

# The long attacks of docs/reliability.md, each against a fresh guard.
attack: $(STAMP)
	$(PY) -m bench.attack --json attack.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build guard/dataplane/_rank*.so guard/dataplane/_walk*.so
