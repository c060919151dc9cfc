# flynnsched: set up a machine, run the daemon, run the tests.
#
#   make run                 the daemon in the foreground (venv, Docker engine, demo images, web assets)
#   make test                the whole test suite; extra pytest arguments: make test PYTEST_ARGS='-x -k batch'
#
# The Docker engine is $DOCKER_HOST if set, else /var/run/docker.sock, else a private engine kept in
# .docker/ (see scripts/docker-engine). Missing Debian packages are installed when running as root.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
# apt-get and the engine start-up must not race each other.
.NOTPARALLEL:

PYTHON ?= python3
VENV ?= .venv
STATE_DIR ?= .state
PYTEST_ARGS ?=
FLYNNSCHED_ARGS ?= --state-dir=$(STATE_DIR)
ENGINE := scripts/docker-engine

VENV_STAMP := $(VENV)/.flynnsched-installed
WEB_STAMP := web/node_modules/.flynnsched-installed
# Ask for the engine in a recipe (not at parse time) so targets that don't need it never look.
# (A plain assignment, so that a failing `ensure` stops the recipe; `export X=$$(...)` would hide it.)
WITH_ENGINE = DOCKER_HOST="$$($(ENGINE) ensure)"; export DOCKER_HOST;

.PHONY: help venv typecheck engine engine-stop engine-status images web browser run test bench bench-smoke clean distclean

help:
	@echo "make run          run flynnsched in the foreground (state in $(STATE_DIR)/)"
	@echo "make test         run the tests (PYTEST_ARGS='...' passes arguments to pytest)"
	@echo "make bench        run the benchmarks; make bench-smoke for a quick pass"
	@echo "make venv         create $(VENV) and install flynnsched and its development tools"
	@echo "make engine       find or start a Docker engine and print its DOCKER_HOST"
	@echo "make engine-stop  stop the private Docker engine in .docker/ (if running)"
	@echo "make images       build the demo images flynn/busybox, flynn/primesum, flynn/helloweb"
	@echo "make clean        remove caches and build output; make distclean also removes $(VENV),"
	@echo "                  web/node_modules, $(STATE_DIR)/ and the private engine's data"

venv: $(VENV_STAMP)

$(VENV_STAMP): setup.py requirements-dev.txt
	@command -v $(PYTHON) >/dev/null || scripts/debian-install python3 python3-venv
	@if [ ! -x $(VENV)/bin/python ]; then \
	    if ! $(PYTHON) -m venv $(VENV); then \
	        rm -rf $(VENV); scripts/debian-install python3-venv; $(PYTHON) -m venv $(VENV); \
	    fi; \
	fi
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e . --config-settings editable_mode=compat
	$(VENV)/bin/python -m pip install --quiet -r requirements-dev.txt
	@touch $@

engine:
	@$(ENGINE) ensure

engine-stop:
	@$(ENGINE) stop

engine-status:
	@$(ENGINE) status

images: engine
	@$(WITH_ENGINE) scripts/build-images

ifneq ($(wildcard web/package-lock.json),)
web: $(WEB_STAMP)
else
web:
	@:
endif

$(WEB_STAMP): web/package-lock.json
	@command -v npm >/dev/null || scripts/debian-install npm
	npm ci --prefix web --no-audit --no-fund --loglevel=error >/dev/null
	@touch $@

browser:
	@scripts/debian-install chromium chromium-driver fonts-dejavu-core fonts-wqy-microhei

run: venv images web
	@mkdir -p $(STATE_DIR)
	@$(WITH_ENGINE) echo "flynnsched: engine at $$DOCKER_HOST, state in $(STATE_DIR)/" >&2; \
	    exec $(VENV)/bin/twistd --pidfile= -n flynnsched $(FLYNNSCHED_ARGS)

# The type check and the benchmark smoke run come first, so pytest's summary closes the output.
test: venv images web browser
	@$(MAKE) --no-print-directory typecheck
	@$(MAKE) --no-print-directory bench-smoke
	@$(WITH_ENGINE) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

typecheck: venv
	$(VENV)/bin/mypy flynnsched

bench: venv images web
	@$(WITH_ENGINE) $(VENV)/bin/python bench/run.py

bench-smoke: venv images web
	@$(WITH_ENGINE) $(VENV)/bin/python bench/run.py --smoke

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .hypothesis
	find . -path ./$(VENV) -prune -o -path ./web/node_modules -prune -o -path ./.docker -prune -o \
	    \( -name __pycache__ -o -name dropin.cache \) -print0 | xargs -0 rm -rf

distclean: clean engine-stop
	rm -rf $(VENV) web/node_modules $(STATE_DIR)
	rm -rf --one-file-system .docker
