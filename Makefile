# Every target bootstraps .venv itself: a newcomer needs only Python 3.11+, pip and gcc.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: serve test test-fast lint docs-check pytest docs bench bench-batch bench-embed bench-ray bench-capacity bench-recall install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when the dependency declarations change.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## make serve: set up, then serve the bundled default model on 127.0.0.1:8000 (ARGS="--model ..." to change)
serve: install
	$(BIN)/embedserve serve $(ARGS)

## make test: set up with the dev extras, then lint, type-check, build the docs strictly and run the whole suite
test: lint docs-check pytest

## make test-fast: the pure and fake-backend tests only (no model, load or PostgreSQL tests), in about a minute
test-fast: install-dev
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not model and not load and not postgres" $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

# The docs site must build with no broken link, anchor or page left out of the nav (mkdocs.yml: strict).
# NO_MKDOCS_2_WARNING silences the theme's banner about its successor: one notice, not a warning.
docs-check: install-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

pytest: install-dev
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

## make docs: serve the documentation site on 127.0.0.1:8001, rebuilt as docs/ changes
docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

## make bench: embedserve vs Infinity and in-process baselines, 3 runs (prints a Markdown table)
bench: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/load.py $(ARGS)

## make bench-batch: the Batch API against bulk HTTP and online latency beside a batch, then bench-embed's table
bench-batch: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/batch.py $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/embed_command.py $(ARGS)

## make bench-embed: `embedserve embed` against in-process ONNX Runtime, 3 runs (prints a Markdown table)
bench-embed: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/embed_command.py $(ARGS)

## make bench-ray: on Ray, the corpus job against the local command and Ray Serve against one server
bench-ray: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/ray_corpus.py $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/ray_serve.py

## make bench-capacity: tokens/s per core by model and precision, the ledger's rate, the limit store's cost
bench-capacity: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/capacity.py $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/ratelimit_store.py

## make bench-recall: recall@10 of int8, uint8 and binary vectors (output_dtype) against float32 (a Markdown table)
bench-recall: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/recall.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .site
