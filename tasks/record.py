"""Writing runs to the results database (one transaction per run; a locked database is retried)."""
from __future__ import annotations

from prefect import get_run_logger, task

from moegen.results import connection, recording
from tasks.common import retry_unless_bad_input

RECORD_RETRIES = dict(retries=3, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)


def as_cells(rows: list[dict]) -> list[recording.CellResult]:
    return [recording.CellResult(system=r["system"], workload=r["workload"], metrics=r["metrics"],
                                 config=r.get("config") or {}, skipped_reason=r.get("skipped_reason")) for r in rows]


def environment_of(doc: dict) -> dict:
    return {"hardware": doc.get("hardware"), "versions": doc.get("versions") or {},
            "git_commit": recording.git_commit_of(doc)}


@task(task_run_name="record-bench", **RECORD_RETRIES)
def record_bench_run(model: str, kind: str, cells: list[dict], environment: dict, tags: list[str],
                     status: str = "ok", flow_run_id: str | None = None, url: str | None = None) -> int:
    """Record a bench matrix (cells with their metrics) as one run; returns the run id."""
    run_id = recording.record_run(model, kind, as_cells(cells), tags=tags, status=status, flow_run_id=flow_run_id,
                                  url=url, **environment)
    get_run_logger().info("recorded %s run %d (%d cells) in %s", kind, run_id, len(cells), connection.resolve_url(url))
    return run_id


@task(task_run_name="record-eval", **RECORD_RETRIES)
def record_eval_run(model: str, evals: list[dict], bench_cells: list[dict], environment: dict, tags: list[str],
                    flow_run_id: str | None = None, url: str | None = None) -> int:
    """Record the lm-eval results of every backend plus the short bench's cells as one eval run."""
    cells = [cell for doc in evals for cell in recording.eval_cells(doc)] + as_cells(bench_cells)
    run_id = recording.record_run(model, "eval", cells, tags=tags, flow_run_id=flow_run_id, url=url, **environment)
    get_run_logger().info("recorded eval run %d (%d cells) in %s", run_id, len(cells), connection.resolve_url(url))
    return run_id


GENERATE_METRICS = ("rows", "prompt_tokens", "generated_tokens", "generate_s", "e2e_tokens_per_s")


@task(task_run_name="record-generate", **RECORD_RETRIES)
def record_generate_run(model: str, summary: dict, config: dict, environment: dict, tags: list[str],
                        flow_run_id: str | None = None, url: str | None = None) -> int:
    """Record a generation run (the generate flow's summary): one moegen cell on the dataset."""
    cell = recording.CellResult(system="moegen", workload=summary["dataset"], config=config,
                                metrics={k: summary[k] for k in GENERATE_METRICS})
    run_id = recording.record_run(model, "generate", [cell], tags=tags, flow_run_id=flow_run_id, url=url, **environment)
    get_run_logger().info("recorded generate run %d in %s", run_id, connection.resolve_url(url))
    return run_id
