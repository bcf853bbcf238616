"""Writing runs to the results database: one run with all its cells and metrics in one
transaction (record_run), and the cells of a bench or eval JSON (record_bench, record_eval)."""
from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from sqlalchemy import select
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from moegen.results.connection import ResultsError, database_call, get_engine
from moegen.results.schema import RUN_KINDS, Environment, Metric, Result, Run, SystemRow, WorkloadRow


@dataclass
class CellResult:
    """One (system, workload) cell of a run: its numbers, its config, or why it was skipped."""
    system: str
    workload: str
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    skipped_reason: str | None = None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    value = float(value)
    return None if math.isnan(value) else value


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float | None]:
    """Numbers of a (possibly nested) metrics dict under dotted names; non-numbers are dropped."""
    flat: dict[str, float | None] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, prefix=f"{name}."))
        elif value is None or isinstance(value, (int, float)) or hasattr(value, "__float__"):
            flat[name] = None if value is None else _as_float(value)
    return flat


def hardware_label(hardware: Any) -> str:
    """A short, stable name for the machine: the GPU if there is one, else the CPU model and count.
    Takes moegen.bench.run's hardware object ({"cpu": {...}, "gpu": {...}}), probe.machine_info's, or a str."""
    if isinstance(hardware, str):
        return hardware
    if not isinstance(hardware, dict) or not hardware:
        return "unknown"
    if hardware.get("label"):
        return str(hardware["label"])
    gpu, cpu = hardware.get("gpu") or {}, hardware.get("cpu") or {}
    if gpu.get("name") or hardware.get("gpu_name"):
        return str(gpu.get("name") or hardware["gpu_name"])
    model = cpu.get("model") or hardware.get("cpu_model") or "cpu"
    count = cpu.get("count") or hardware.get("cpu_count")
    return f"{model} x{count}" if count else str(model)


def _insert_or_get(session: Session, model, key: str, **values) -> int:
    """The id of the row whose unique `key` column equals values[key], inserted if absent. Safe
    with concurrent writers: INSERT ... ON CONFLICT DO NOTHING, then read back (elsewhere a
    savepoint around the insert, its IntegrityError meaning another writer was first)."""
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        insert = importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert
        session.execute(insert(model).values(**values).on_conflict_do_nothing(index_elements=[key]))
    elif session.scalars(select(model.id).filter_by(**{key: values[key]})).first() is None:
        try:
            with session.begin_nested():
                session.add(model(**values))
        except sa_exc.IntegrityError:
            pass
    return session.scalars(select(model.id).filter_by(**{key: values[key]})).one()


def _environment(session: Session, hardware: Any, versions: dict, git_commit: str | None) -> int:
    info = hardware if isinstance(hardware, dict) else {"label": hardware_label(hardware)}
    blob = json.dumps([hardware_label(hardware), versions, git_commit], sort_keys=True, default=str)
    fingerprint = hashlib.sha256(blob.encode()).hexdigest()
    return _insert_or_get(session, Environment, "fingerprint", fingerprint=fingerprint,
                          hardware=hardware_label(hardware), hardware_info=json.loads(json.dumps(info, default=str)),
                          versions=json.loads(json.dumps(versions, default=str)), git_commit=git_commit)


def _add_cell(session: Session, run: Run, cell: CellResult) -> None:
    result = Result(system_id=_insert_or_get(session, SystemRow, "name", name=cell.system),
                    workload_id=_insert_or_get(session, WorkloadRow, "name", name=cell.workload),
                    config=json.loads(json.dumps(cell.config, default=str)), skipped_reason=cell.skipped_reason)
    run.results.append(result)
    for name, value in flatten_metrics(cell.metrics).items():
        result.metrics.append(Metric(name=name, value=value))
    session.flush()


@database_call
def record_run(model: str, kind: str, cells: Iterable[CellResult], hardware: Any = None,
               versions: dict | None = None, git_commit: str | None = None, tags: Iterable[str] = (),
               status: str = "ok", flow_run_id: str | None = None, created_at: dt.datetime | None = None,
               url: str | None = None) -> int:
    """Write one run with all its cells and metrics in a single transaction; return its id."""
    if kind not in RUN_KINDS:
        raise ResultsError(f"run kind must be one of {', '.join(RUN_KINDS)}, not {kind!r}")
    with Session(get_engine(url)) as session, session.begin():
        run = Run(kind=kind, model=str(model), status=status, tags=sorted(set(tags)),
                  flow_run_id=flow_run_id, created_at=created_at or dt.datetime.now(dt.timezone.utc),
                  environment_id=_environment(session, hardware, versions or {}, git_commit))
        session.add(run)
        for cell in cells:
            _add_cell(session, run, cell)
        session.flush()
        return run.id


def _bench_systems(bench: dict) -> list[dict]:
    if not isinstance(bench.get("systems"), list):
        raise ResultsError("bench JSON has no 'systems' list (one object per system)")
    return bench["systems"]


def _workload_name(workload: Any) -> str:
    """A workload's spec string (what the user asked for, the same night after night)."""
    if isinstance(workload, dict):
        return str(workload.get("spec") or workload.get("name") or json.dumps(workload, sort_keys=True))
    if not workload:
        raise ResultsError("bench JSON names no workload")
    return str(workload)


def _skipped_reason(body: dict) -> str | None:
    if body.get("skipped_reason"):
        return str(body["skipped_reason"])
    if body.get("status", "ok") != "ok":
        return f"{body['status']}: {body.get('reason') or 'no reason given'}"
    return None


def bench_cells(bench: dict) -> list[CellResult]:
    """The cells of a `moegen.bench.run.run_bench` result: one per system on its workload."""
    workload = _workload_name(bench.get("workload") or (bench.get("config") or {}).get("workload"))
    cells = []
    for body in _bench_systems(bench):
        name = body.get("system") or body.get("name")
        if not name:
            raise ResultsError("a bench system object has no 'system' name")
        cells.append(CellResult(system=str(name), workload=workload, metrics=dict(body.get("metrics") or {}),
                                config=body.get("config") or {}, skipped_reason=_skipped_reason(body)))
    return cells


def git_commit_of(doc: dict) -> str | None:
    """The commit a bench/eval JSON was made at (`git_commit`, `commit` or `git.commit`)."""
    commit = doc.get("git_commit") or doc.get("commit")
    if isinstance(doc.get("git"), dict):
        commit = commit or doc["git"].get("commit")
    return commit


def record_bench(bench: dict, kind: str = "bench", tags: Iterable[str] = (), model: str | None = None,
                 status: str = "ok", flow_run_id: str | None = None, url: str | None = None) -> int:
    """Record a bench result (the JSON of `moegen.bench.run.run_bench`, or several merged)."""
    model = model or bench.get("model") or (bench.get("config") or {}).get("model")
    if not model:
        raise ResultsError("bench JSON names no model and none was given")
    return record_run(model, kind, bench_cells(bench), hardware=bench.get("hardware"),
                      versions=bench.get("versions") or {}, git_commit=git_commit_of(bench), tags=tags,
                      status=status, flow_run_id=flow_run_id, url=url)


# lm-eval metrics that stand for a task's accuracy, preferred first (strict match over the lenient
# extraction); cells store them with "." for lm-eval's "," (see eval_cells)
HEADLINE_ACCURACY = ("exact_match,strict-match", "exact_match,flexible-extract", "acc,none", "exact_match,none")


def headline_accuracy(metrics: dict) -> float | None:
    """One task's accuracy from its lm-eval metrics (either separator), or a cell's `accuracy`."""
    if isinstance(metrics.get("accuracy"), (int, float)):
        return float(metrics["accuracy"])
    named = {k.replace(".", ",", 1): v for k, v in metrics.items()}
    return next((float(named[k]) for k in HEADLINE_ACCURACY if isinstance(named.get(k), (int, float))), None)


def eval_cells(evaluation: dict, system: str | None = None) -> list[CellResult]:
    """The cells of an evaluation: one per lm-eval task, holding that task's metrics."""
    results = evaluation.get("results")
    if not isinstance(results, dict) or not results:
        raise ResultsError("eval JSON has no 'results' (lm-eval metrics per task)")
    system = system or evaluation.get("system") or "moegen"
    config = {k: evaluation[k] for k in ("limit", "num_fewshot", "dtype", "device") if k in evaluation}
    return [CellResult(system=str(system), workload=task, config=config,
                       metrics={k.replace(",", "."): v for k, v in metrics.items() if k != "alias"})
            for task, metrics in results.items()]


def record_eval(evaluation: dict | list[dict], model: str | None = None, tags: Iterable[str] = (),
                extra_cells: Iterable[CellResult] = (), status: str = "ok", flow_run_id: str | None = None,
                url: str | None = None) -> int:
    """Record one or more `moegen.eval.run.run_eval` results (one per system) as one eval run;
    `extra_cells` adds cells such as the throughput of a short bench beside the accuracy."""
    docs = [evaluation] if isinstance(evaluation, dict) else list(evaluation)
    if not docs:
        raise ResultsError("record_eval got no evaluation results")
    model = model or docs[0].get("model")
    if not model:
        raise ResultsError("eval JSON names no model and none was given")
    cells = [cell for doc in docs for cell in eval_cells(doc)] + list(extra_cells)
    first = docs[0]
    return record_run(model, "eval", cells, hardware=first.get("hardware"), versions=first.get("versions") or {},
                      git_commit=git_commit_of(first), tags=tags, status=status, flow_run_id=flow_run_id, url=url)
