"""Reading runs back from the results database: one run, the history, two runs compared, and
the nightlies' baseline and trend. Readers never write (moegen.results.connection.reading)."""
from __future__ import annotations

from typing import Any

from sqlalchemy import select

from moegen.results.connection import ResultsError, database_call, masked, reading, resolve_url
from moegen.results.recording import hardware_label
from moegen.results.schema import NIGHTLY, Environment, Result, Run, SystemRow, WorkloadRow


def _result_dict(result: Result) -> dict:
    return {"system": result.system.name, "workload": result.workload.name, "config": result.config,
            "skipped_reason": result.skipped_reason, "metrics": {m.name: m.value for m in result.metrics}}


def _run_dict(run: Run) -> dict:
    env = run.environment
    return {"id": run.id, "kind": run.kind, "model": run.model, "created_at": run.created_at.isoformat(),
            "status": run.status, "tags": run.tags, "flow_run_id": run.flow_run_id, "hardware": env.hardware,
            "git_commit": env.git_commit, "versions": env.versions,
            "results": [_result_dict(r) for r in run.results]}


@database_call
def get_run(run_id: int, url: str | None = None) -> dict:
    """One run with its environment, cells and metrics."""
    with reading(url) as session:
        run = session.get(Run, int(run_id)) if session is not None else None
        if run is None:
            raise ResultsError(f"no run {run_id} in {masked(resolve_url(url))}")
        return _run_dict(run)


@database_call
def history(last: int = 20, kind: str | None = None, model: str | None = None, system: str | None = None,
            workload: str | None = None, hardware: str | None = None, tag: str | None = None,
            flow_run_id: str | None = None, url: str | None = None) -> list[dict]:
    """The `last` runs matching the filters, newest first, each with its cells and metrics."""
    query = select(Run).join(Run.environment).order_by(Run.created_at.desc(), Run.id.desc())
    for column, value in ((Run.kind, kind), (Run.model, model), (Environment.hardware, hardware),
                          (Run.flow_run_id, flow_run_id)):
        if value is not None:
            query = query.where(column == value)
    if system is not None:
        query = query.where(Run.results.any(Result.system.has(SystemRow.name == system)))
    if workload is not None:
        query = query.where(Run.results.any(Result.workload.has(WorkloadRow.name == workload)))
    if tag is None:
        query = query.limit(last)
    with reading(url) as session:
        if session is None:
            return []
        runs = [run for run in session.scalars(query) if tag is None or tag in run.tags]   # tags: a JSON list
        return [_run_dict(run) for run in runs[:last]]


def compare(run_a: int, run_b: int, url: str | None = None) -> list[dict]:
    """Metric by metric, the cells the two runs share: a, b and b/a (None where a is 0 or missing)."""
    a, b = get_run(run_a, url), get_run(run_b, url)
    b_cells = {(c["system"], c["workload"]): c["metrics"] for c in b["results"]}
    rows = []
    for cell in a["results"]:
        other = b_cells.get((cell["system"], cell["workload"]))
        if other is None:
            continue
        for name in sorted(set(cell["metrics"]) | set(other)):
            va, vb = cell["metrics"].get(name), other.get(name)
            ratio = vb / va if va not in (None, 0) and vb is not None else None
            rows.append({"system": cell["system"], "workload": cell["workload"], "metric": name,
                         "a": va, "b": vb, "ratio": ratio})
    return rows


BASELINE_NIGHTLIES = 5


@database_call
def nightly_baseline(model: str, system: str, workload: str, hardware: Any, last: int = BASELINE_NIGHTLIES,
                     before_run: int | None = None, url: str | None = None) -> dict | None:
    """The last `last` healthy nightlies of this (model, system, workload) on the same hardware,
    newest first: {"runs": [id], "created_at": [iso], "metrics": {name: [value per run]}}; None if
    there is none. Healthy: the run's status is "ok" (a regressed nightly never joins the baseline,
    so a real regression keeps alarming) and the cell ran. `before_run` excludes that run and later."""
    query = (select(Run, Result).join(Run.environment).join(Run.results).join(Result.system).join(Result.workload)
             .where(Run.kind == NIGHTLY, Run.status == "ok", Run.model == str(model), SystemRow.name == system,
                    WorkloadRow.name == workload, Environment.hardware == hardware_label(hardware),
                    Result.skipped_reason.is_(None))
             .order_by(Run.created_at.desc(), Run.id.desc()))
    if before_run is not None:
        query = query.where(Run.id < int(before_run))
    with reading(url) as session:
        rows = session.execute(query.limit(max(1, int(last)))).all() if session is not None else []
        if not rows:
            return None
        metrics: dict[str, list] = {}
        for _, result in rows:
            for m in result.metrics:
                metrics.setdefault(m.name, []).append(m.value)
        return {"runs": [run.id for run, _ in rows], "created_at": [run.created_at.isoformat() for run, _ in rows],
                "metrics": metrics}


@database_call
def nightly_series(model: str, metric: str, last: int = 30, url: str | None = None) -> dict[tuple, list]:
    """(system, workload, hardware) -> [(created_at, value, status)] of the last `last` nightlies
    of `model`, oldest first: the trend the nightly report plots."""
    query = (select(Run, Result, SystemRow.name, WorkloadRow.name, Environment.hardware)
             .join(Run.environment).join(Run.results).join(Result.system).join(Result.workload)
             .where(Run.kind == NIGHTLY, Run.model == str(model), Result.skipped_reason.is_(None))
             .order_by(Run.created_at.desc(), Run.id.desc()))
    series: dict[tuple, list] = {}
    with reading(url) as session:
        for run, result, system, workload, hardware in session.execute(query) if session is not None else ():
            value = next((m.value for m in result.metrics if m.name == metric), None)
            points = series.setdefault((system, workload, hardware), [])
            if value is not None and len(points) < last:
                points.append((run.created_at, value, run.status))
    return {key: points[::-1] for key, points in series.items() if points}
