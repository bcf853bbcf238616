"""Accuracy: lm-eval tasks through moegen's lm-eval backend or lm-eval's own `hf` backend."""
from __future__ import annotations

from prefect import get_run_logger, task
from pydantic import BaseModel, ConfigDict

from moegen.results.recording import headline_accuracy
from tasks.common import key_from_inputs, retry_unless_bad_input

LOCAL_TO_HUB = {"gsm8k_local": "gsm8k"}   # lm-eval's own task reads the hub's openai/gsm8k


def hub_task_names(tasks: list[str]) -> list[str]:
    """The hub-backed lm-eval task for each local task (for machines without the local data)."""
    return [LOCAL_TO_HUB.get(name, name) for name in tasks]


def accuracy_summary(result: dict) -> dict[str, float]:
    """task -> headline accuracy (moegen.results.recording.headline_accuracy) from lm-eval results."""
    summary = {name: headline_accuracy(metrics) for name, metrics in result.get("results", {}).items()}
    return {name: acc for name, acc in summary.items() if acc is not None}


class EvalSpec(BaseModel):
    """One lm-eval run: `tasks` on the checkpoint through backend `system` (moegen | hf), as one
    typed value from the flow to run_lm_eval."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    model_path: str
    tasks: list[str]
    system: str
    limit: int | None = None
    num_fewshot: int | None = None
    dtype: str = "bfloat16"
    device: str = "cpu"
    max_gen_toks: int | None = None
    engine_options: dict | None = None


@task(cache_key_fn=key_from_inputs, persist_result=True, retries=1, retry_condition_fn=retry_unless_bad_input,
      task_run_name="lm-eval-{spec.system}")
def run_lm_eval(spec: EvalSpec, scope: str = "") -> dict:
    """The spec's lm-eval run. Cached on the spec and `scope`, so a resumed flow run does not
    evaluate a finished system again."""
    from moegen.eval.run import run_eval

    result = run_eval(spec.model_path, spec.tasks, limit=spec.limit, system=spec.system, dtype=spec.dtype,
                      device=spec.device, num_fewshot=spec.num_fewshot, engine_options=spec.engine_options or None,
                      gen_kwargs=f"max_gen_toks={spec.max_gen_toks}" if spec.max_gen_toks else None)
    get_run_logger().info("%s: %s in %.1f s", spec.system, accuracy_summary(result), result.get("wall_s", 0.0))
    return result
