# kvcluster — `make run` starts a local 3-node cluster, `make test` runs every test.
# Both create .venv on a fresh machine first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard proto/kvcluster/wire/v1/*.proto)
# Python code, gRPC stubs and typed .pyi stubs for both (mypy-protobuf)
PROTOC  = $(BIN)/python -m grpc_tools.protoc -Iproto \
	--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
	--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc
DEV_DIR ?= .kvcluster/dev

.PHONY: run stop test test-fast lint typecheck proto check-proto bench bench-load clean venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $(STAMP)

venv: $(STAMP)

## run: start a local 3-node cluster (N=3, R=2, W=2) in the background
run: $(STAMP)
	$(BIN)/kvctl dev up --nodes 3 --dir $(DEV_DIR)

## stop: stop the cluster `make run` started
stop: $(STAMP)
	$(BIN)/kvctl dev down --dir $(DEV_DIR)

## test: lint, type-check, stale-proto check, then every test
test: $(STAMP) lint typecheck check-proto
	$(BIN)/pytest -q -p no:cacheprovider

## test-fast: unit, property and simulation tests only
test-fast: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/unit tests/property tests/sim

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check kvcluster jepsen-lite tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

## proto: regenerate kvcluster/wire/v1 from proto/
proto: $(STAMP)
	rm -f kvcluster/wire/v1/*_pb2*.py kvcluster/wire/v1/*_pb2*.pyi
	$(PROTOC) --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=. $(PROTOS)

## check-proto: fail if the committed generated code is stale
check-proto: $(STAMP)
	@tmp=$$(mktemp -d) && \
	$(PROTOC) --python_out=$$tmp --mypy_out=$$tmp --grpc_python_out=$$tmp --mypy_grpc_out=$$tmp $(PROTOS) && \
	diff -r -x __init__.py -x __pycache__ $$tmp/kvcluster/wire/v1 kvcluster/wire/v1 >/dev/null || \
	  { echo "generated protobuf code is stale: run 'make proto' and commit"; rm -rf $$tmp; exit 1; }; \
	rm -rf $$tmp

## bench: kvcluster vs etcd side by side (YCSB A/B/C/F + batches, pipelined client; ~8 min)
bench: $(STAMP)
	$(BIN)/python -m benchmarks.ycsb --vs etcd --kv-pipeline --duration 20 --out .bench/latest

## bench-load: put/get ops/s and p50/p99/p999 at concurrency 1, 16, 64
bench-load: $(STAMP)
	$(BIN)/python -m benchmarks.load --concurrency 1,16,64 --repeat 3

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
