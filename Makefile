# The two commands of the README. Both create .venv on first use (idempotent: a stamp file is rebuilt only when
# pyproject.toml changes). `make test` also installs the extras its tests use (export: onnx, onnxruntime, torchao;
# executorch; hf: transformers, accelerate; timm) so that those tests run instead of skipping.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
XSTAMP  := $(VENV)/.installed-export

.PHONY: demo test test-fast test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

$(XSTAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,export,executorch,hf,timm,peft]"
	# llama.cpp for the GGUF runtime test: built from source on first install (~10 min on 2 cores, wheel cached by
	# pip); where it cannot build, that one test skips with the reason
	$(BIN)/python -m pip install -q -e ".[llamacpp]" || echo "llama-cpp-python did not build: test_gguf's llama.cpp parity test will skip"
	touch $(XSTAMP)

demo: $(STAMP)
	$(BIN)/fxqat demo

test: $(XSTAMP)
	$(BIN)/ruff check fxqat tests benchmarks examples
	$(BIN)/python -m pytest -q -m "not slow" --doctest-modules fxqat tests
	$(BIN)/python -m pytest -q -m slow tests

test-fast: $(XSTAMP)
	$(BIN)/python -m pytest -q -m "not slow" -x tests

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/hybrid_cost.py

clean:
	rm -rf $(VENV) build *.egg-info
