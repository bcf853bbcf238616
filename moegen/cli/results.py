"""`moegen results`: the results database as tables.

    moegen results [--last N] [--kind K] [--model M] [--db URL]    recent runs, one row per cell
    moegen results --compare RUN_A RUN_B [--db URL]                 metric by metric, B against A
"""
from __future__ import annotations

import argparse

from rich.table import Table

from moegen.results import connection, queries, recording, schema
from moegen.console import make_console
from moegen.results.metrics import TABLE_METRICS, label

# the history table's columns: the metrics table's headline (accuracy first, read by headline_accuracy)
HEADLINE = TABLE_METRICS[1:]


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:,.4g}" if abs(value) < 1 else f"{value:,.1f}"
    return f"{value:.3e}"


def history_table(runs: list[dict]) -> Table:
    table = Table(title="moegen results", show_lines=False)
    for column in ("run", "when (UTC)", "kind", "model", "hardware", "commit", "system", "workload"):
        table.add_column(column, justify="right" if column == "run" else "left")
    for column in ("accuracy", *HEADLINE):
        table.add_column(label(column, short=True), justify="right")
    for run in runs:
        kind = run["kind"] if run["status"] == "ok" else f"{run['kind']} ({run['status']})"
        head = [str(run["id"]), run["created_at"][:16].replace("T", " "), kind, short_model(run["model"]),
                run["hardware"], (run["git_commit"] or "-")[:8]]
        for cell in run["results"] or [{"system": "-", "workload": "-", "metrics": {}}]:
            table.add_row(*head, cell["system"], cell["workload"], *cell_figures(cell))
            head = [""] * len(head)
    return table


def cell_figures(cell: dict) -> list[str]:
    if cell.get("skipped_reason"):
        return ["skipped: " + cell["skipped_reason"][:60]] + [""] * len(HEADLINE)
    m = cell["metrics"]
    return [fmt(recording.headline_accuracy(m)), *(fmt(m.get(k)) for k in HEADLINE)]


def short_model(model: str, width: int = 40) -> str:
    return model if len(model) <= width else "…" + model[-(width - 1):]


def compare_table(run_a: int, run_b: int, rows: list[dict]) -> Table:
    table = Table(title=f"run {run_b} against run {run_a}")
    for column in ("system", "workload", "metric", f"run {run_a}", f"run {run_b}", "b / a"):
        table.add_column(column, justify="right" if column.startswith(("run", "b /")) else "left")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        table.add_row(r["system"], r["workload"], r["metric"], fmt(r["a"]), fmt(r["b"]), ratio)
    return table




def cmd_results(args: argparse.Namespace) -> None:
    console = make_console()
    if args.compare:
        run_a, run_b = args.compare
        rows = queries.compare(run_a, run_b, url=args.db)
        if not rows:
            raise connection.ResultsError(f"runs {run_a} and {run_b} share no (system, workload) cell")
        console.print(compare_table(run_a, run_b, rows))
        return
    runs = queries.history(last=args.last, kind=args.kind, model=args.model, url=args.db)
    if not runs:
        console.print(f"no runs in {connection.masked(connection.resolve_url(args.db))}")
        return
    console.print(history_table(runs))


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add `results` to the `moegen` command's subparsers."""
    p = subparsers.add_parser("results", help="show recorded runs or compare two of them")
    p.add_argument("--last", type=int, default=10, help="how many recent runs (default 10)")
    p.add_argument("--compare", nargs=2, type=int, metavar=("RUN_A", "RUN_B"), help="compare two runs by id")
    p.add_argument("--kind", choices=schema.RUN_KINDS, help="only runs of this kind")
    p.add_argument("--model", help="only runs of this model")
    p.add_argument("--db", help=f"SQLAlchemy URL (default ${connection.URL_ENV} or sqlite:///results/moegen.db)")
    p.set_defaults(func=cmd_results)
    return p
