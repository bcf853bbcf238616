"""Numbers from raw results: cells of a bench matrix, ratios against a baseline, the eval table,
and the nightly regression check."""
from __future__ import annotations

import statistics

from prefect import get_run_logger, task

from moegen.results import queries, recording
from moegen.bench.ratios import metric_ratios
from moegen.results.metrics import LOWER_IS_BETTER, RATIO_METRICS, REGRESSION_METRICS
from moegen.errors import ConfigError

DEFAULT_REGRESSION_METRICS = REGRESSION_METRICS
# lm-eval backend of the eval flow -> the bench system measured for its throughput
EVAL_TO_BENCH = {"moegen": "moegen", "hf": "hf-generate"}


def cells_from_bench(docs: list[dict]) -> list[dict]:
    """Flat cells {system, workload, metrics, config, skipped_reason, hardware} of bench results."""
    cells = []
    for doc in docs:
        for cell in recording.bench_cells(doc):
            cells.append({"system": cell.system, "workload": cell.workload, "config": cell.config,
                          "skipped_reason": cell.skipped_reason,
                          "hardware": recording.hardware_label(doc.get("hardware")),
                          "metrics": {**recording.flatten_metrics(cell.metrics), **repeat_spreads(cell.metrics)}})
    return cells


def repeat_spreads(metrics: dict) -> dict[str, float]:
    """`spread.<metric>` for each metric measured in several passes (`repeats_<metric>`: the bench
    reports their median): how much worse than that median the worst pass was. Recorded with the
    run, it tells the regression check how noisy this machine is within one nightly."""
    out = {}
    for key, passes in metrics.items():
        if key.startswith("repeats_") and isinstance(passes, list) and len(passes) > 1:
            name = key.removeprefix("repeats_")
            out[f"spread.{name}"] = baseline_figure([float(p) for p in passes], name)[1]
    return out


def add_ratios(cells: list[dict], baseline: str, metrics: tuple[str, ...] = RATIO_METRICS) -> list[dict]:
    """Each cell with `ratios` against the baseline system's cell of the same workload."""
    base = {c["workload"]: c["metrics"] for c in cells if c["system"] == baseline and not c["skipped_reason"]}
    out = []
    for cell in cells:
        ref = base.get(cell["workload"])
        ratios = {} if ref is None else metric_ratios(cell["metrics"], ref, metrics)
        out.append({**cell, "ratios": {k: v for k, v in ratios.items() if v is not None}})
    return out


def outputs_of(doc: dict) -> tuple[str, str, list | None]:
    """(workload spec, system, generated token ids or None if it did not run) of a one-system bench."""
    body = doc["systems"][0]
    tokens = [o["token_ids"] for o in body.get("outputs") or []] if body["status"] == "ok" else None
    return recording.bench_cells(doc)[0].workload, body["system"], tokens


def agreement_metrics(docs: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (system, workload): how far its greedy tokens agree with the first system that ran on
    that workload (moegen.bench.run.compare_tokens), the reference itself included (1.0)."""
    from moegen.bench.run import compare_tokens

    reference: dict[str, list] = {}
    found = {}
    for doc in docs:
        workload, system, tokens = outputs_of(doc)
        if tokens is None:
            continue
        ref = reference.setdefault(workload, tokens)
        cmp = compare_tokens(ref, tokens)
        found[(system, workload)] = {"token_agreement": cmp["token_agreement"],
                                     "sequence_agreement": cmp["sequence_agreement"],
                                     "sequences_compared": cmp["sequences"],
                                     "sequences_differ": cmp["sequences"] - cmp["sequences_equal"]}
    return found


@task(task_run_name="compute-bench-table")
def compute_bench_table(docs: list[dict], baseline: str) -> list[dict]:
    """Cells of every bench result (system order kept) with their agreement with the workload's
    first system and their ratios against `baseline`."""
    cells = cells_from_bench(docs)
    if not cells:
        raise ConfigError("the bench produced no results")
    agreement = agreement_metrics(docs)
    for cell in cells:
        cell["metrics"].update(agreement.get((cell["system"], cell["workload"]), {}))
    if baseline not in {c["system"] for c in cells}:
        get_run_logger().warning("baseline %s is not among the systems run; no ratios", baseline)
    return add_ratios(cells, baseline)


@task(task_run_name="compute-eval-table")
def compute_eval_table(evals: list[dict], bench_cells: list[dict], baseline: str) -> list[dict]:
    """One row per lm-eval backend: accuracy per task beside the throughput of its bench system."""
    from tasks.evaluation import accuracy_summary

    by_system = {c["system"]: c["metrics"] for c in bench_cells if not c["skipped_reason"]}
    base_answers = next((answers_of(doc) for doc in evals if doc["system"] == baseline), None)
    rows = []
    for doc in evals:
        system = doc["system"]
        bench_system = EVAL_TO_BENCH.get(system, system)
        accs = {f"accuracy.{task}": acc for task, acc in accuracy_summary(doc).items()}
        bench = {("bench_" + k if k in ("accuracy", "correct") else k): v
                 for k, v in by_system.get(bench_system, {}).items()}
        metrics = {**accs, **bench, "accuracy": sum(accs.values()) / len(accs) if accs else None}
        metrics["eval_wall_s"] = doc.get("wall_s")
        metrics.update(answers_against(doc, base_answers))
        rows.append({"system": system, "bench_system": bench_system, "workload": ",".join(doc.get("tasks", [])),
                     "metrics": metrics, "config": {}, "skipped_reason": None})
    # backends are compared by their answers (answers_differ), not by a ratio of accuracies: on a few
    # questions one flipped near-tie moves the ratio a lot and says nothing about the backend
    return add_ratios(rows, baseline, tuple(m for m in RATIO_METRICS if m != "accuracy"))


def answers_of(doc: dict) -> dict:
    """(task, doc_id, filter) -> a backend's answer in an lm-eval result: the extracted answer of a
    generation task, the chosen option (highest log-likelihood) of a multiple-choice one."""
    def answer(response):
        if isinstance(response, (list, tuple)) and response and all(isinstance(r, (list, tuple)) and r for r in response):
            scores = [r[0] for r in response]           # [(log-likelihood, is_greedy)] per option
            return scores.index(max(scores))
        return response
    return {(task, s["doc_id"], s["filter"]): answer(s["filtered_response"])
            for task, samples in doc.get("samples", {}).items() for s in samples}


def answers_against(doc: dict, base: dict | None) -> dict:
    """questions: answered by both this backend and the baseline; answers_differ: on how many of
    them the two answers differ (0 for the baseline itself)."""
    if base is None:
        return {}
    mine = answers_of(doc)
    shared = [key for key in mine if key in base]
    return {"questions": len(shared), "answers_differ": sum(mine[k] != base[k] for k in shared)}


def relative_drop(new: float, old: float, name: str) -> float:
    """How much worse `new` is than `old`, as a fraction of `old` (negative = better)."""
    change = (new - old) / old
    return change if name in LOWER_IS_BETTER else -change


def baseline_figure(values: list[float], name: str) -> tuple[float, float]:
    """(median, spread) of a metric over the baseline nightlies: spread is how much worse than the
    median a healthy nightly has been (a fraction of the median; 0 for a single run), the noise a
    new figure must exceed before it counts as a regression."""
    median = statistics.median(values)
    if median == 0:
        return median, 0.0
    return median, max(0.0, *(relative_drop(v, median, name) for v in values))


def cell_regressions(cell: dict, baseline: dict, threshold: float, metrics: tuple[str, ...]) -> list[dict]:
    """Figures of `cell` worse than the baseline's median by more than `threshold` and by more
    than the baseline's own spread (noise that healthy nightlies showed is no regression)."""
    found = []
    for name in metrics:
        new, values = cell["metrics"].get(name), [v for v in baseline["metrics"].get(name, []) if v is not None]
        if new is None or not values:
            continue
        old, spread = baseline_figure(values, name)
        if old == 0:
            continue
        # the noise seen within a nightly (its passes), this one's or the baseline's, counts too
        passes = [cell["metrics"].get(f"spread.{name}"), *baseline["metrics"].get(f"spread.{name}", [])]
        spread = max([spread, *(s for s in passes if s is not None)])
        drop = relative_drop(new, old, name)
        if drop > threshold and drop > spread:
            found.append({"system": cell["system"], "workload": cell["workload"], "metric": name, "previous": old,
                          "current": new, "drop": drop, "spread": spread, "baseline_runs": baseline["runs"],
                          "previous_at": baseline["created_at"][0]})
    return found


@task(task_run_name="find-regressions")
def find_regressions(cells: list[dict], model: str, threshold: float, metrics: list[str],
                     before_run: int | None = None, url: str | None = None,
                     last: int = queries.BASELINE_NIGHTLIES) -> list[dict]:
    """Figures that fell by more than `threshold` (and more than the baseline's spread) against
    the median of the last `last` healthy nightlies of the same (model, system, workload, hardware)."""
    logger = get_run_logger()
    found = []
    for cell in cells:
        if cell["skipped_reason"]:
            continue
        baseline = queries.nightly_baseline(model, cell["system"], cell["workload"], cell["hardware"],
                                            last=last, before_run=before_run, url=url)
        if baseline is None:
            logger.info("no healthy nightly yet for %s on %s: nothing to compare", cell["system"], cell["workload"])
            continue
        found += cell_regressions(cell, baseline, threshold, tuple(metrics))
    for r in found:
        logger.warning("regression: %s/%s %s %.4g -> %.4g (-%.1f%%; baseline median of %d nightlies, spread %.1f%%)",
                       r["system"], r["workload"], r["metric"], r["previous"], r["current"], 100 * r["drop"],
                       len(r["baseline_runs"]), 100 * r["spread"])
    return found
