# Signet — every target installs what it needs first (see `make setup`).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := softhsm2 etcd-server etcd-client p11-kit-modules openssl docker-registry skopeo chromium
STAMP := $(VENV)/.installed

.PHONY: setup system-packages venv demo test test-unit test-integration lint proto bench clean

setup: system-packages $(STAMP)

# Installs the Debian packages Signet runs against, only when one is missing.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" -ne 0 ]; then SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: setup
	$(PY) -m signer.dev.demo

test: setup
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check signer kms tests bench
	$(VENV)/bin/mypy

proto: setup
	$(PY) -m signer.proto_gen

bench: setup
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench.run --soak 300

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
