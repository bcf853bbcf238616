"""Datasets: local JSONL/parquet files through HF `datasets`, or a hub dataset for users online.
GSM8K is read in place from MOEGEN_GSM8K_DIR or ../shared/data/gsm8k, never copied."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from prefect import get_run_logger, task

from moegen.errors import InputError, MoegenError
from moegen.eval.tasks.gsm8k_data import ENV_VAR as GSM8K_ENV
from moegen.bench.workloads import default_gsm8k_dir
from tasks.common import retry_unless_bad_input

GSM8K_HUB = "openai/gsm8k"


class DatasetError(MoegenError):
    """A dataset cannot be found locally and cannot be fetched."""


def hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (and offline mode is not asked for)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_bad_input,
      task_run_name="load-dataset-{split}")
def load_dataset_rows(source: str, split: str = "test", limit: int | None = None,
                      config: str | None = None) -> list[dict]:
    """Rows of a dataset (first `limit`): a local JSONL/JSON/parquet/CSV file, a local directory
    (`<split>.jsonl` ...), or a hub name with an optional `config` (subset)."""
    from moegen.bench.workloads import load_rows

    rows = [dict(row) for row in load_rows(source, split, config, limit)]
    if not rows:
        raise DatasetError(f"dataset {source} ({split}) holds no rows")
    get_run_logger().info("loaded %d rows from %s (%s)", len(rows), source, split)
    return rows


@task(task_run_name="resolve-gsm8k")
def resolve_gsm8k(local_dir: str | None = None, splits: tuple[str, ...] = ("test",)) -> dict:
    """Where GSM8K comes from: the local copy if it holds every split asked for (the eval's
    few-shot examples need train too), else the hub's openai/gsm8k when online.
    Returns {"source", "config", "local"}."""
    local = Path(local_dir) if local_dir else default_gsm8k_dir()
    if all((local / f"{split}.jsonl").is_file() for split in splits):
        return {"source": str(local.resolve()), "config": None, "local": True}
    if hub_reachable():
        get_run_logger().warning("GSM8K not found at %s; using the hub's %s", local, GSM8K_HUB)
        return {"source": GSM8K_HUB, "config": "main", "local": False}
    raise DatasetError(f"GSM8K not found at {local} (set {GSM8K_ENV}) and the hub is unreachable")


def prompt_of_row(row: dict, index: int, template: str | None, field: str | None) -> str | list[int]:
    """One prompt from a row, with the rules of `moegen generate` (template, field, prompt, ids)."""
    from moegen.generation.prompts import prompt_of
    return prompt_of(row, f"row {index}", field, template)


@task(task_run_name="build-prompts")
def build_prompts(rows: list[dict], template: str | None = None, field: str | None = None) -> list:
    """Prompts (text or token ids) from dataset rows; a bad row is an InputError naming it."""
    if not rows:
        raise InputError("no rows to build prompts from")
    return [prompt_of_row(row, i, template, field) for i, row in enumerate(rows)]
