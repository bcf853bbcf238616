"""Generation into a durable journal, as `moegen generate` does it (moegen.generation.job): the whole
dataset goes to the engine (or its Ray replicas) in one call, each finished row is appended to
out_dir/completions.jsonl and made durable every flush_rows rows or flush_seconds, so a crash costs
only the rows in flight and a re-run with the same inputs generates only the rows the journal
lacks. A Prefect progress artifact follows the rows."""
from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from moegen.generation.job import GenerationJob, GenerationSummary

OUTPUT = "completions.jsonl"
PROGRESS_EVERY_S = 2.0      # at most one progress update per this many seconds (each is an API call)


class ProgressArtifact:
    """A Prefect progress artifact: percent of the dataset's rows in the journal."""

    def __init__(self, total: int, resumed: int):
        self.total, self.resumed = total, resumed
        self.id = create_progress_artifact(self.percent(0), key="generate-progress",
                                           description=f"{resumed} of {total} rows kept from an earlier run")
        self.updated = time.monotonic()

    def percent(self, rows: int) -> float:
        return 100.0 * (self.resumed + rows) / self.total

    def close(self, tally) -> None:
        self.update(tally, force=True)

    def update(self, tally, force: bool = False) -> None:
        if force or time.monotonic() - self.updated >= PROGRESS_EVERY_S:
            update_progress_artifact(self.id, self.percent(tally.rows),
                                     description=f"{self.resumed + tally.rows}/{self.total} rows, "
                                                 f"{tally.tokens_per_s:.1f} generated tok/s")
            self.updated = time.monotonic()


@task(cache_policy=NO_CACHE, task_run_name="generate-rows")
def generate_rows(job: GenerationJob) -> GenerationSummary:
    """The job's pending rows, from an Engine or Replicas in one call, into its journal
    (moegen.generation.job); a Prefect progress artifact follows the rows."""
    summary = job.run(progress=ProgressArtifact)
    get_run_logger().info("%s: %d rows kept from an earlier run; %d rows, %d new tokens, %.1f tok/s", job.out,
                          summary.resumed_rows, summary.generated_rows, summary.generated_tokens,
                          summary.e2e_tokens_per_s)
    return summary
