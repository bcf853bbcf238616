"""Throughput: one system under test on one workload, measured by moegen.bench.run."""
from __future__ import annotations

from prefect import get_run_logger, task
from pydantic import BaseModel, ConfigDict

from tasks.common import key_from_inputs, retry_unless_bad_input


class BenchCell(BaseModel):
    """One (system, workload) measurement with everything it is measured with: what travels from a
    flow to run_bench_cell, as one typed value (the flows build it once per cell)."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    model_path: str
    system: str
    workload: str
    repeat: int = 1
    dtype: str = "bfloat16"
    device: str = "cpu"
    options: dict | None = None
    probe: str = "quick"
    usd_per_hour: float | None = None


@task(cache_key_fn=key_from_inputs, persist_result=True, retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_bad_input, task_run_name="bench-{cell.system}-on-{cell.workload}")
def run_bench_cell(cell: BenchCell, scope: str = "") -> dict:
    """One cell of a bench matrix: moegen.bench.run.run_bench's JSON for this system alone, with its
    outputs (to check agreement between systems). Cached on the cell and `scope`, so a resumed flow
    run does not measure a finished cell again."""
    from moegen.bench.run import run_bench

    result = run_bench(cell.model_path, [cell.system], cell.workload, repeat=cell.repeat, dtype=cell.dtype,
                       device=cell.device, usd_per_hour=cell.usd_per_hour,
                       options={cell.system: cell.options} if cell.options else None, probe=cell.probe, outputs=True)
    body = result["systems"][0]
    get_run_logger().info("%s on %s: %s, %s e2e tok/s", cell.system, cell.workload, body["status"] if not body["reason"]
                          else f"{body['status']} ({body['reason']})", body["metrics"].get("e2e_tokens_per_s"))
    return result
