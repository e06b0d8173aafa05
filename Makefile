# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test lint format demo demo-quick agent-binary lambda-zip bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
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

demo: $(STAMP)
	$(BIN)/python demo/run_demo.py

demo-quick: $(STAMP)
	$(BIN)/python demo/run_demo.py --quick

# Build one self-contained agent executable: make agent-binary VERSION=0.1.44 OUT=dist/avika-agent [PUBLIC_KEYS=k1,k2]
agent-binary: $(STAMP)
	@test -n "$(VERSION)" || { echo "usage: make agent-binary VERSION=V OUT=FILE [PUBLIC_KEYS=k1,k2]" >&2; exit 2; }
	@test -n "$(OUT)" || { echo "usage: make agent-binary VERSION=V OUT=FILE [PUBLIC_KEYS=k1,k2]" >&2; exit 2; }
	$(BIN)/python packaging/build_agent.py --version "$(VERSION)" --out "$(OUT)" --public-keys "$(PUBLIC_KEYS)"

# The reports + console Lambda's package (handler infra.reports.handler.handler): manylinux wheels of
# cryptography and packaging for the function's platform, resolved from the package index now (set-up).
LAMBDA_OUT ?= dist/avika-reports-lambda.zip
LAMBDA_PLATFORM ?= linux-arm64
LAMBDA_PYTHON ?= 3.12
lambda-zip: $(STAMP)
	$(BIN)/python packaging/build_lambda.py --out "$(LAMBDA_OUT)" --platform "$(LAMBDA_PLATFORM)" --python "$(LAMBDA_PYTHON)"

clean:
	rm -rf build dist demo-run .pytest_cache .ruff_cache
