# The commands of the README: `make demo` (the main job), `make test` (the whole suite) and `make unit`
# (the unit tests alone, no service). Each installs what it needs into .venv (with uv: seconds instead of
# minutes with pip).

VENV      ?= .venv
BIN       := $(VENV)/bin
PYTHON    ?= python3
BUILD     := build
# Airflow's home for the commands run here, so nothing is written into ~/airflow.
export AIRFLOW_HOME ?= $(CURDIR)/.airflow

.PHONY: all venv demo test unit lint typecheck pytest services-up services-down clean

all: test

$(BIN)/.installed: pyproject.toml
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv \
		|| $(PYTHON) -m pip install --quiet --break-system-packages uv
	uv venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	VIRTUAL_ENV=$(VENV) uv pip install --quiet -e '.[test]'
	@touch $@

venv: $(BIN)/.installed

$(BUILD)/mnist-model.zip: $(wildcard examples/mnist/model/*.py) | venv
	@mkdir -p $(BUILD)
	rm -f $@ && $(BIN)/python -m zipfile -c $@ $^

# The main job: the MNIST example trained end to end through Airflow on the local services (Swift+S3,
# Docker, the offline-built PyTorch image), then the results listing and the model's accuracy.
demo: venv $(BUILD)/mnist-model.zip
	$(BIN)/python scripts/demo.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# The real services the integration tests use (Docker Engine, a stand-in GPU Docker host, Swift+S3).
services-up:
	scripts/services up >/dev/null

services-down:
	scripts/services down

pytest: venv services-up
	$(BIN)/python -m pytest

test: lint typecheck pytest

# The unit tests alone: no service (a stand-in Docker Engine API and an in-memory object store), seconds.
unit: venv
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf $(BUILD) .pytest_cache .mypy_cache .ruff_cache .hypothesis
