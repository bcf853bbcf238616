"""Reports for people: a table artifact, PNG plots (throughput per system, the CAP radar) written
beside the results database, and a markdown report with ratios against the baseline that links
to the plots."""
from __future__ import annotations

import base64
import importlib.util
import math
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from moegen.results import queries
from moegen.results.metrics import LOWER_IS_BETTER, TABLE_METRICS, label

# CAP radar spokes: (group, metric); cost is drawn as efficiency so that outward is always better.
CAP_AXES = (("A", "accuracy"), ("P", "e2e_tokens_per_s"), ("P", "decode_s_mbu"), ("P", "decode_s_mfu"),
            ("C", "usd_per_million_tokens"))


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def table_metrics(rows: list[dict]) -> list[str]:
    """The headline metrics some row has, plus any per-task accuracy columns."""
    present = {k for r in rows for k, v in r["metrics"].items() if v is not None}
    per_task = sorted(k for k in present if k.startswith("accuracy."))
    return [*per_task, *(m for m in TABLE_METRICS if m in present)]


def table_rows(rows: list[dict], baseline: str) -> list[dict]:
    """Rows for the table artifact: one per cell, metrics then ratios against the baseline."""
    metrics = table_metrics(rows)
    out = []
    for r in rows:
        row = {"system": r["system"], "workload": r["workload"]}
        if r.get("skipped_reason"):
            row["note"] = "skipped: " + r["skipped_reason"]
        row.update({label(m): fmt(r["metrics"].get(m)) for m in metrics})
        row.update({f"{label(m)} vs {baseline}": fmt(v) for m, v in r.get("ratios", {}).items()
                    if m in metrics})
        out.append(row)
    return out


# ---- plots ------------------------------------------------------------------------------------

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_throughput(rows: list[dict], path: Path) -> Path | None:
    """Grouped bars: for each workload, each system's e2e / prefill / decode tokens per second."""
    metrics = [m for m in ("e2e_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s")
               if any(r["metrics"].get(m) for r in rows)]
    if not metrics:
        return None
    plt = pyplot()
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    width = 0.8 / len(systems)
    for ax, metric in zip(axes[0], metrics):
        for j, system in enumerate(systems):
            values = [next((r["metrics"].get(metric) or 0 for r in rows
                            if r["system"] == system and r["workload"] == w), 0) for w in workloads]
            ax.bar([i + j * width for i in range(len(workloads))], values, width, label=system)
        ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(workloads))])
        ax.set_xticklabels([w[:28] for w in workloads], rotation=15, fontsize=7)
        ax.set_title(label(metric))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trend(series: dict[str, dict[tuple, list]], path: Path) -> Path | None:
    """One panel per headline figure: each (system, workload) over the last nightlies, regressed
    nightlies marked with an x (they are not part of the baseline)."""
    series = {metric: lines for metric, lines in series.items() if lines}
    if not series:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.6), squeeze=False)
    for ax, (metric, lines) in zip(axes[0], series.items()):
        for (system, workload, _hardware), points in lines.items():
            when, values = [p[0] for p in points], [p[1] for p in points]
            (line,) = ax.plot(when, values, marker="o", markersize=3, label=f"{system} / {workload[:24]}")
            bad = [(w, v) for w, v, status in points if status != "ok"]
            if bad:
                ax.scatter(*zip(*bad), marker="x", s=60, color=line.get_color())
        ax.set_title(label(metric))
        ax.tick_params(axis="x", labelrotation=25, labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cap_scores(rows: list[dict]) -> tuple[list[str], dict[str, list[float]]]:
    """Spoke labels and, per system, each spoke's value relative to the best system (1 = best;
    cost as cheapest / own). Accuracy, throughput and cost are always spokes (0 and "n/a" when
    unmeasured, e.g. no price given); S-MBU and S-MFU are spokes when measured."""
    by_system: dict[str, dict] = {}
    for r in rows:
        if not r.get("skipped_reason"):
            by_system.setdefault(r["system"], r["metrics"])
    axes = [(g, m) for g, m in CAP_AXES
            if g != "P" or m == "e2e_tokens_per_s" or any(v.get(m) is not None for v in by_system.values())]
    labels, scores = [], {s: [] for s in by_system}
    for group, metric in axes:
        values = {s: v.get(metric) for s, v in by_system.items()}
        known = [v for v in values.values() if v is not None and math.isfinite(v) and v > 0]
        labels.append(f"{group}: {label(metric)}" + ("" if any(v is not None for v in values.values()) else " (n/a)"))
        for system, value in values.items():
            scores[system].append(relative_score(value, known, metric in LOWER_IS_BETTER))
    return labels, scores


def relative_score(value: float | None, known: list[float], lower_is_better: bool) -> float:
    if value is None or not known or not math.isfinite(value) or value <= 0:
        return 0.0
    return min(known) / value if lower_is_better else value / max(known)


def plot_cap_radar(rows: list[dict], path: Path) -> Path | None:
    """MoE-CAP's radar, one per workload: cost, accuracy and performance of each system."""
    workloads = list(dict.fromkeys(r["workload"] for r in rows if not r.get("skipped_reason")))
    if not workloads:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.2 * len(workloads), 5.2), squeeze=False,
                             subplot_kw={"polar": True})
    for ax, workload in zip(axes[0], workloads):
        draw_radar(ax, *cap_scores([r for r in rows if r["workload"] == workload]))
        ax.set_title(workload[:40], fontsize=9, pad=18)
    axes[0][-1].legend(loc="upper right", bbox_to_anchor=(1.35, 1.12), fontsize=8)
    fig.suptitle("CAP radar: 1 = best system on each spoke (cost drawn as efficiency)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_radar(ax, labels: list[str], scores: dict[str, list[float]]) -> None:
    angles = [2 * math.pi * i / len(labels) for i in range(len(labels))]
    for system, values in scores.items():
        ax.plot(angles + angles[:1], values + values[:1], label=system)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.15)
    ax.set_xticks(angles)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_rlabel_position(180 / len(labels))
    ax.tick_params(axis="y", labelsize=7)


def write_plots(rows: list[dict], root: Path, notes: list[str], trend: dict | None = None) -> dict[str, Path]:
    """The PNGs that apply, by name; without matplotlib none, and a note saying so."""
    if importlib.util.find_spec("matplotlib") is None:
        notes.append("no plots: matplotlib is not installed (pip install 'moegen[harness]')")
        return {}
    plots = {"throughput": plot_throughput(rows, root / "throughput.png"),
             "CAP radar": plot_cap_radar(rows, root / "cap_radar.png"),
             "nightly trend": plot_trend(trend, root / "trend.png") if trend else None}
    return {name: path for name, path in plots.items() if path}


# ---- markdown ---------------------------------------------------------------------------------

def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def ratio_lines(rows: list[dict], baseline: str) -> list[str]:
    lines = []
    for r in rows:
        if r["system"] == baseline or not r.get("ratios"):
            continue
        parts = [f"{label(m)} **{v:.2f}x**" for m, v in r["ratios"].items()]
        lines.append(f"- `{r['system']}` on `{r['workload']}`: " + ", ".join(parts))
    return lines or [f"- no ratios: baseline `{baseline}` has no results to compare with"]


def data_uri(path: Path) -> str:
    """A PNG inlined, so the Prefect UI (served over http) can show it: browsers refuse file:// images there."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def render_markdown(title: str, rows: list[dict], baseline: str, plots: dict[str, Path], run_id: int | None,
                    notes: list[str], link, image=None) -> str:
    """The report: summary notes, ratios against the baseline, the table, links to the plots.
    `link(path)` turns a plot path into a link target (absolute file URL or relative name);
    `image(path)` the image source shown inline (default: the link)."""
    parts = [f"# {title}", ""]
    parts += [f"- {n}" for n in notes] + ([f"- results database run id: **{run_id}**"] if run_id else [])
    parts += ["", f"## Against `{baseline}` (> 1 is better, cost inverted)", "", *ratio_lines(rows, baseline)]
    parts += ["", "## Results", "", markdown_table(table_rows(rows, baseline))]
    if plots:
        parts += ["", "## Plots", ""] + [f"- [{name}]({link(path)})" for name, path in plots.items()]
        parts += [""] + [f"![{name}]({(image or link)(path)})" for name, path in plots.items()]
    return "\n".join(parts) + "\n"


@task(task_run_name="render-report-{kind}")
def render_report(kind: str, title: str, rows: list[dict], baseline: str, out_dir: str, run_id: int | None = None,
                  notes: list[str] | None = None, trend: dict | None = None) -> dict:
    """Write the plots and report.md under out_dir and publish the table and markdown artifacts.
    `trend`: metric -> moegen.results.queries.nightly_series, plotted as the nightly trend.
    Returns the paths written."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    notes = list(notes or [])
    plots = write_plots(rows, root, notes, trend)
    (root / "report.md").write_text(render_markdown(title, rows, baseline, plots, run_id, notes, lambda p: p.name))
    markdown = render_markdown(title, rows, baseline, plots, run_id, notes + [f"report directory: `{root}`"],
                               lambda p: p.resolve().as_uri(), image=data_uri)
    create_table_artifact(table_rows(rows, baseline), key=f"{kind}-results", description=f"{title}: results")
    create_markdown_artifact(markdown, key=f"{kind}-report", description=title)
    get_run_logger().info("report written to %s", root / "report.md")
    return {"dir": str(root), "report": str(root / "report.md"), "plots": {k: str(v) for k, v in plots.items()}}


@task(task_run_name="render-report-generate")
def render_generate_report(summary: dict) -> str:
    """A markdown summary of a generation run, as an artifact."""
    kept = f", {summary['resumed_rows']} kept from an earlier run" if summary["resumed_rows"] else ""
    on = f" on {summary['replicas']} replicas" if summary["replicas"] > 1 else ""
    markdown = "\n".join([
        f"# generate: {summary['rows']} rows of `{summary['dataset']}`", "",
        f"- model `{summary['model']}`",
        f"- output `{summary['out']}` ({summary['generated_rows']} rows generated by this run{kept})",
        f"- {summary['generated_tokens']} new tokens for {summary['prompt_tokens']} prompt tokens in "
        f"{summary['generate_s']:.1f} s of generation{on}: **{summary['e2e_tokens_per_s']:.1f} tok/s**"]) + "\n"
    create_markdown_artifact(markdown, key="generate-report", description="generation summary")
    return markdown


@task(task_run_name="nightly-trend")
def nightly_trend(model: str, metrics: list[str], url: str | None = None, last: int = 30) -> dict:
    """metric -> {(system, workload, hardware): [(time, value, status)]} over the last nightlies."""
    return {metric: queries.nightly_series(model, metric, last=last, url=url) for metric in metrics}


@task(task_run_name="report-regressions")
def report_regressions(regressions: list[dict], threshold: float, model: str) -> str:
    """A markdown artifact naming each figure that fell, by how much, and against which run."""
    lines = [f"# Nightly regression: {len(regressions)} figure(s) fell by more than {threshold:.0%}", "",
             f"Model `{model}`; each figure against the median of the last healthy nightlies of the same "
             "model, system, workload and hardware, and beyond their own spread (noise is no regression).", "",
             "| system | workload | metric | previous | now | change | baseline spread | baseline runs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in regressions:
        lines.append(f"| {r['system']} | {r['workload']} | {label(r['metric'])} | "
                     f"{fmt(r['previous'])} | {fmt(r['current'])} | -{100 * r['drop']:.1f}% | "
                     f"{100 * r['spread']:.1f}% | {', '.join(map(str, r['baseline_runs']))} "
                     f"(latest {r['previous_at'][:16]}) |")
    markdown = "\n".join(lines) + "\n"
    create_markdown_artifact(markdown, key="bench-regressions", description="figures that fell since the last nightly")
    return markdown
