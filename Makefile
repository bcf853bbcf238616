# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
# Both create .venv if needed. torch is installed first from TORCH_SPEC so that pip does not
# pull a CUDA build on CPU machines; GPU users: make TORCH_SPEC="torch==2.13.0 --index-url ..."
SHELL := /bin/bash
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= ../shared/data/gsm8k
RUN_DIR ?= runs
FIXTURE := $(RUN_DIR)/fixtures/mixtral-bench
LIMIT ?= 256
NEW_TOKENS ?= 64

.PHONY: run test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

run: $(STAMP)
	$(VENV)/bin/moegen fixture --arch mixtral --preset bench --seed 0 --out $(FIXTURE)
	$(VENV)/bin/moegen generate --model $(FIXTURE) --input $(DATA)/test.jsonl --limit $(LIMIT) \
		--template $$'Question: {question}\nAnswer:' --max-new-tokens $(NEW_TOKENS) --out $(RUN_DIR)/gsm8k-generate.jsonl

clean:
	rm -rf $(VENV) $(RUN_DIR)
