"""Throughput: one system under test on one workload, measured by moegen.bench.run."""
from __future__ import annotations

from prefect import get_run_logger, task

from tasks.common import key_from_inputs, retry_unless_bad_input


@task(cache_key_fn=key_from_inputs, persist_result=True, retries=1, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_bad_input, task_run_name="bench-{system}-on-{workload}")
def run_bench_cell(model_path: str, system: str, workload: str, repeat: int = 1, dtype: str = "bfloat16",
                   device: str = "cpu", options: dict | None = None, probe: str = "quick",
                   usd_per_hour: float | None = None, scope: str = "") -> dict:
    """One (system, workload) cell of a bench matrix: moegen.bench.run.run_bench's JSON for this system
    alone, with its outputs (to check agreement between systems). Cached on its inputs and `scope`,
    so a resumed flow run does not measure a finished cell again."""
    from moegen.bench.run import run_bench

    result = run_bench(model_path, [system], workload, repeat=repeat, dtype=dtype, device=device,
                       usd_per_hour=usd_per_hour, options={system: options} if options else None, probe=probe,
                       outputs=True)
    body = result["systems"][0]
    get_run_logger().info("%s on %s: %s, %s e2e tok/s", system, workload, body["status"] if not body["reason"]
                          else f"{body['status']} ({body['reason']})", body["metrics"].get("e2e_tokens_per_s"))
    return result
