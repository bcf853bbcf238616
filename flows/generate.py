"""Flow `generate`: a dataset through the moegen engine into JSONL shards, resumable after a crash.

    python -m flows.generate '{"limit": 64, "sampling": {"max_new_tokens": 32}}'

Re-running with the same parameters continues where a crashed run stopped: shards listed in
out_dir/manifest.json are kept, the others are generated; completions.jsonl is rebuilt from the
shards at the end, so every row appears exactly once.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import PositiveInt

from flows.common import describe_environment, flow_run_id
from flows.params import DType, Device, EngineOptions, ModelRef, Sampling
from moegen.harness.workloads import DEFAULT_TEMPLATE
from tasks.data import build_prompts, load_dataset_rows, resolve_gsm8k
from tasks.generate import (completed_shards, generate_shard, generation_fingerprint, merge_shards, open_manifest,
                            plan_shards, shard_summary)
from tasks.models import load_engine, prepare_model
from tasks.record import record_generate_run
from tasks.report import render_generate_report


def resolve_source(dataset: str) -> dict:
    """`gsm8k` means the local copy, else the hub's; anything else is a path or a hub name."""
    if dataset == "gsm8k":
        return resolve_gsm8k()
    return {"source": dataset, "config": None, "local": Path(dataset).exists()}


def prompt_template(dataset: str, template: str | None) -> str | None:
    """The template asked for; GSM8K's question template when none is given for `gsm8k`."""
    return template or (DEFAULT_TEMPLATE if dataset == "gsm8k" else None)


@flow(name="generate", description="dataset -> moegen engine -> JSONL shards (resumable)")
def generate_flow(model: ModelRef = "fixture:mixtral/bench", dataset: str = "gsm8k", split: str = "test",
                  limit: PositiveInt | None = None, template: str | None = None,
                  prompt_field: str | None = None, keep_fields: list[str] = ["answer"],  # noqa: B006
                  out_dir: str = "runs/generate/gsm8k", shard_size: PositiveInt = 64,
                  sampling: Sampling = Sampling(), dtype: DType = "bfloat16", device: Device = "cpu",
                  engine: EngineOptions = EngineOptions(), overwrite: bool = False, record: bool = True,
                  results_url: str | None = None, tags: list[str] = []) -> dict:  # noqa: B006
    """Generate completions for `dataset` (`gsm8k`, a JSONL/parquet file or directory, or a hub
    name) into out_dir/shard-*.jsonl and out_dir/completions.jsonl; returns a summary. Prompts come
    from `template` (a format string over row fields), `prompt_field`, or each row's `prompt` /
    `prompt_token_ids`, as in `moegen generate`."""
    model_path = prepare_model(model)
    source = resolve_source(dataset)
    rows = load_dataset_rows(source["source"], split, limit, source["config"])
    prompts = build_prompts(rows, prompt_template(dataset, template), prompt_field)
    plan = plan_shards(len(prompts), shard_size)
    fingerprint = generation_fingerprint(model_path, prompts, sampling.model_dump(), shard_size)
    open_manifest(out_dir, fingerprint, len(prompts), shard_size, overwrite)
    done = completed_shards(out_dir)
    pending = [p for p in plan if p[0] not in done]
    if pending:
        llm = load_engine(model_path, dtype, device, engine.host_memory,
                          engine.model_dump(exclude_none=True, exclude={"host_memory"}))
        kept = [{k: r[k] for k in keep_fields if k in r} for r in rows]
        for index, start, stop in pending:
            generate_shard(llm, prompts[start:stop], index, start, out_dir, sampling.model_dump(), kept[start:stop])
    merged = merge_shards(out_dir, len(plan))
    summary = {**shard_summary(out_dir), "out": merged, "resumed_shards": len(done), "model": model,
               "dataset": source["source"], "generated_shards": [p[0] for p in pending]}
    render_generate_report(out_dir, summary)
    if record and pending:
        config = {"split": split, "limit": limit, "sampling": sampling.model_dump(), "dtype": dtype, "device": device,
                  "engine": engine.set_options(), "out_dir": out_dir}
        summary["run_id"] = record_generate_run(model, summary, config, describe_environment(device), tags,
                                                flow_run_id(), results_url)
    return summary


if __name__ == "__main__":
    from flows.cli import run_flow_from_argv
    run_flow_from_argv(generate_flow)
