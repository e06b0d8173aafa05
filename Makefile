# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# An agent file runs on CPython 3.9 - 3.13: the agent's unit tests also run under the oldest and the
# newest (each in .venv-pyXY, with the wheels an agent file ships). `make test COMPAT_PYTHONS=` skips them.
COMPAT_PYTHONS ?= 3.9 3.13
# The agent's own modules (pure logic and I/O; no publisher, Lambda, moto or boto3): ~1 min per Python.
COMPAT_TESTS := tests/test_agent_cache.py tests/test_config.py tests/test_decide.py tests/test_environment.py \
	tests/test_state.py tests/test_manifest_rules.py tests/test_manifest_vectors.py \
	tests/test_manifest_properties.py tests/test_install.py tests/test_fetch.py tests/test_transport.py \
	tests/test_download_writeback.py tests/test_agent_reports.py tests/test_reports_validation.py \
	tests/test_lifecycle.py tests/test_agent_check_cli.py tests/test_quick_exit.py

.PHONY: venv test lint format demo demo-quick agent-binary agent-binary-args lambda-zip bench clean

# Set-up (the only step that uses the network): the dev venv, the agent's locked wheels for every
# platform and Python (into .venv/pex-root, for `make agent-binary`), the compat venvs.
$(STAMP): pyproject.toml packaging/agent-lock.json
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python packaging/build_agent.py --fetch
	$(if $(strip $(COMPAT_PYTHONS)),$(BIN)/python packaging/compat_venv.py $(COMPAT_PYTHONS))
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest
	@$(foreach v,$(COMPAT_PYTHONS),echo "== the agent's unit tests under Python $(v)" && \
		$(VENV)-py$(subst .,,$(v))/bin/python -m pytest -p no:cacheprovider $(COMPAT_TESTS) &&) true

demo: $(STAMP)
	$(BIN)/python demo/run_demo.py

demo-quick: $(STAMP)
	$(BIN)/python demo/run_demo.py --quick

# One agent file (CPython 3.9 - 3.13, glibc >= 2.17), built offline from the locked wheels:
#   make agent-binary VERSION=0.1.44 OUT=dist/avika-agent-linux-amd64 PUBLIC_KEYS=k1,k2 [PLATFORM=linux-arm64]
# PUBLIC_KEYS (the keys agents trust) is required; PUBLIC_KEYS=none builds a keyless file on purpose.
AGENT_USAGE := make agent-binary VERSION=V OUT=FILE PUBLIC_KEYS=k1,k2|none [PLATFORM=linux-amd64|linux-arm64]
PLATFORM ?= linux-amd64
agent-binary: agent-binary-args $(STAMP)
	$(BIN)/python packaging/build_agent.py --version "$(VERSION)" --out "$(OUT)" \
		--public-keys "$(PUBLIC_KEYS)" --platform "$(PLATFORM)"

# Checked before anything is set up or built (prerequisites run in order).
agent-binary-args:
	@test -n "$(VERSION)" || { echo "make agent-binary: VERSION is required ($(AGENT_USAGE))" >&2; exit 2; }
	@test -n "$(OUT)" || { echo "make agent-binary: OUT is required ($(AGENT_USAGE))" >&2; exit 2; }
	@test -n "$(strip $(PUBLIC_KEYS))" || { echo "make agent-binary: PUBLIC_KEYS is required: the base64 \
	Ed25519 keys agents running this file trust (comma-separated), or PUBLIC_KEYS=none to build a keyless \
	file on purpose" >&2; exit 2; }

# The reports + console Lambda's package (handler infra.reports.handler.handler): manylinux wheels of
# cryptography and packaging for the function's platform, resolved from the package index now (set-up).
LAMBDA_OUT ?= dist/avika-reports-lambda.zip
LAMBDA_PLATFORM ?= linux-arm64
LAMBDA_PYTHON ?= 3.12
lambda-zip: $(STAMP)
	$(BIN)/python packaging/build_lambda.py --out "$(LAMBDA_OUT)" --platform "$(LAMBDA_PLATFORM)" --python "$(LAMBDA_PYTHON)"

clean:
	rm -rf build dist demo-run .pytest_cache .ruff_cache
