"""Flow `generate`: a dataset through the moegen engine (or N replicas on Ray) into a durable
JSONL journal, resumable after a crash.

    python -m flows.generate '{"limit": 64, "sampling": {"max_new_tokens": 32}}'

Every finished row is appended to out_dir/completions.jsonl as it arrives and made durable every
flush_rows rows or flush_seconds; re-running with the same parameters keeps those rows and
generates the rest in one engine call, so every row appears exactly once. At the end the file is
rewritten in input order (order="finish" keeps finish order).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow
from pydantic import NonNegativeFloat, PositiveInt

from flows.common import check_resume_limit, describe_environment, flow_run_id, is_resumed
from flows.params import DType, Device, EngineOptions, ModelRef, ResultsURL, Sampling
from moegen.errors import InputError
from moegen.engine.params import SamplingParams
from moegen.generation.job import GenerationJob
from moegen.bench.workloads import DEFAULT_TEMPLATE
from moegen.recipe import EngineRecipe
from tasks.data import build_prompts, load_dataset_rows, resolve_gsm8k
from tasks.generate import OUTPUT, generate_rows
from tasks.models import prepare_model
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


@flow(name="generate", description="dataset -> moegen engine (or Ray replicas) -> a resumable JSONL journal")
def generate_flow(model: ModelRef = "fixture:mixtral/bench", dataset: str = "gsm8k", split: str = "test",
                  limit: PositiveInt | None = None, template: str | None = None,
                  prompt_field: str | None = None, keep_fields: list[str] = ["answer"],  # noqa: B006
                  out_dir: str = "runs/generate/gsm8k", sampling: Sampling = Sampling(), dtype: DType = "bfloat16",
                  device: Device = "cpu", engine: EngineOptions = EngineOptions(), replicas: PositiveInt = 1,
                  ray_address: str | None = None, flush_rows: PositiveInt = 64, flush_seconds: NonNegativeFloat = 10.0,
                  order: Literal["input", "finish"] = "input", overwrite: bool = False, wait: bool = False,
                  record: bool = True, results_url: ResultsURL = None,
                  tags: list[str] = []) -> dict:  # noqa: B006
    """Generate completions for `dataset` (`gsm8k`, a JSONL/parquet file or directory, or a hub
    name) into out_dir/completions.jsonl; returns a summary (rows in the output, rows kept from an
    earlier run, and this run's rows, tokens and tokens/s). Prompts come from `template` (a format
    string over row fields), `prompt_field`, or each row's `prompt` / `prompt_token_ids`, as in
    `moegen generate`. replicas > 1 (or ray_address, to join a cluster) runs that many engines as
    Ray actors: one GPU each on cuda, the CPUs split among them on cpu. One run writes an out_dir at
    a time: another is refused, naming its PID, or with wait=true waits for it."""
    check_resume_limit()
    out = Path(out_dir) / OUTPUT
    if Path(dataset).exists() and out.exists() and Path(dataset).samefile(out):
        raise InputError(f"dataset {dataset} is the output {out}: the output would overwrite it; choose another out_dir")
    model_path = prepare_model(model)
    source = resolve_source(dataset)
    rows = load_dataset_rows(source["source"], split, limit, source["config"])
    prompts = build_prompts(rows, prompt_template(dataset, template), prompt_field)
    kept = [{k: r[k] for k in keep_fields if k in r} for r in rows]
    job = GenerationJob(EngineRecipe.from_settings(model_path, {"dtype": dtype, "device": device, **engine.set_options()}),
                        prompts, SamplingParams(**sampling.model_dump()), str(out), kept=kept, order=order,
                        flush_rows=flush_rows, flush_seconds=flush_seconds, overwrite=overwrite,
                        # resumed after a crash: wait for whatever still holds the output (what the crashed
                        # run left behind, or a second start of this same run) rather than fail the resume
                        wait=wait or is_resumed(),
                        replicas=replicas, ray_address=ray_address)
    ran = generate_rows(job)
    summary = {**ran.as_dict(), "model": model, "dataset": source["source"], "replicas": replicas}
    render_generate_report(summary)
    if record and ran.generated_rows:
        config = {"split": split, "limit": limit, "sampling": sampling.model_dump(), "dtype": dtype, "device": device,
                  "engine": engine.set_options(), "replicas": replicas, "out_dir": out_dir}
        summary["run_id"] = record_generate_run(model, summary, config, describe_environment(device), tags,
                                                flow_run_id(), results_url)
    return summary


if __name__ == "__main__":
    from flows.cli import run_flow_from_argv
    run_flow_from_argv(generate_flow)
