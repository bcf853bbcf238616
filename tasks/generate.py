"""Generation into a durable journal (moegen.generation.journal): the whole dataset goes to the engine
(or its Ray replicas) in one call, each finished row is appended to out_dir/completions.jsonl and
made durable every flush_rows rows or flush_seconds, so a crash costs only the rows in flight and a
re-run with the same inputs generates only the rows the journal lacks. A Prefect progress
artifact follows the rows."""
from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from moegen.generation.journal import Journal, fingerprint, sampling_fingerprint, write_completions
from moegen.generation.replicas import EngineRecipe

OUTPUT = "completions.jsonl"
PROGRESS_EVERY_S = 2.0      # at most one progress update per this many seconds (each is an API call)


def generation_fingerprint(model_path: str, prompts: list, kept: list[dict], sampling: dict, dtype: str,
                           engine: dict) -> dict:
    """What decides the rows: model, prompts with the fields copied beside them, sampling, and the
    engine settings that change tokens (dtype, context length)."""
    rows = [{"prompt": p, **k} for p, k in zip(prompts, kept)]
    return fingerprint(model_path, rows, sampling_fingerprint(sampling), {"dtype": dtype, "max_model_len": engine.get("max_model_len")})


@task(cache_policy=NO_CACHE, task_run_name="open-journal")
def open_journal(out: str, fingerprint: dict, flush_rows: int, flush_seconds: float, overwrite: bool,
                 wait: bool = False) -> Journal:
    """The output's journal: its rows kept when it was made from the same inputs, refused (or, with
    overwrite, started over) when from others; a torn last line is cut off. One writer at a time:
    another process on the same output is refused (or, with wait, waited for)."""
    journal = Journal(out, fingerprint, flush_rows, flush_seconds, overwrite, wait)
    get_run_logger().info("%s: %d rows already there", out, journal.resumed)
    return journal


class ProgressArtifact:
    """A Prefect progress artifact: percent of the dataset's rows in the journal."""

    def __init__(self, total: int, resumed: int):
        self.total, self.resumed = total, resumed
        self.id = create_progress_artifact(self.percent(0), key="generate-progress",
                                           description=f"{resumed} of {total} rows kept from an earlier run")
        self.updated = time.monotonic()

    def percent(self, rows: int) -> float:
        return 100.0 * (self.resumed + rows) / self.total

    def update(self, tally, force: bool = False) -> None:
        if force or time.monotonic() - self.updated >= PROGRESS_EVERY_S:
            update_progress_artifact(self.id, self.percent(tally.rows),
                                     description=f"{self.resumed + tally.rows}/{self.total} rows, "
                                                 f"{tally.tokens_per_s:.1f} generated tok/s")
            self.updated = time.monotonic()


def engine_recipe(model_path: str, dtype: str, device: str, engine: dict) -> EngineRecipe:
    """How the engine (or each replica's) is built from the flow's settings."""
    return EngineRecipe(model_path, kwargs={"dtype": dtype, "device": device, **engine})


@task(cache_policy=NO_CACHE, task_run_name="generate-rows")
def generate_rows(source, journal: Journal, prompts: list, pending: list[int], sampling: dict,
                  kept: list[dict]) -> dict:
    """The pending rows, from an Engine or Replicas in one call, into the journal; returns this
    run's figures."""
    from moegen.engine import SamplingParams

    progress = ProgressArtifact(len(prompts), journal.resumed)
    completions = source.generate_iter([prompts[i] for i in pending], SamplingParams(**sampling), indices=pending)
    tally = write_completions(journal, completions, kept, on_row=progress.update)
    progress.update(tally, force=True)
    get_run_logger().info("%d rows, %d new tokens, %.1f tok/s", tally.rows, tally.generated_tokens,
                          tally.tokens_per_s)
    return {"generated_rows": tally.rows, "prompt_tokens": tally.prompt_tokens,
            "generated_tokens": tally.generated_tokens, "generate_s": round(tally.wall_s, 3),
            "e2e_tokens_per_s": tally.tokens_per_s}


@task(cache_policy=NO_CACHE, task_run_name="finish-journal")
def finish_journal(journal: Journal, order: str) -> str:
    """The final output: rewritten in input order (atomically), or left in finish order."""
    return str(journal.finish(order))


NOTHING_GENERATED = {"generated_rows": 0, "prompt_tokens": 0, "generated_tokens": 0, "generate_s": 0.0,
                     "e2e_tokens_per_s": 0.0}
