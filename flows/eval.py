"""Flow `eval`: lm-eval tasks × lm-eval backends on one model, accuracy beside throughput.

    python -m flows.eval limit=16 num_fewshot=0           # fixture Mixtral, local GSM8K

Accuracy comes from lm-eval through each backend in `systems` (moegen, hf); throughput from a
short bench of `bench_systems` (moegen, hf-generate) on `bench_workload`. Without the local GSM8K
copy, a machine that can reach the hub uses lm-eval's `gsm8k` task and openai/gsm8k instead.
"""
from __future__ import annotations

from pydantic import NonNegativeInt, PositiveFloat, PositiveInt
from prefect import flow

from flows.common import (cache_scope, check_resume_limit, describe_environment, flow_run_id, report_dir,
                          system_options)
from flows.params import (DType, Device, EngineOptions, EvalSystemNames, ModelRef, OptionalSystemNames, ProbeMode,
                          ResultsURL, TaskNames, WorkloadSpec)
from moegen.errors import ConfigError
from moegen.eval.tasks import LOCAL_TASKS
from moegen.eval.tasks.gsm8k_data import SPLITS as GSM8K_SPLITS
from moegen.bench.workloads import workload_kind
from tasks.data import GSM8K_HUB, resolve_gsm8k
from tasks.evaluation import EvalSpec, hub_task_names, run_lm_eval
from tasks.metrics import EVAL_TO_BENCH, compute_bench_table, compute_eval_table
from tasks.models import prepare_model
from tasks.record import environment_of, record_eval_run
from tasks.report import render_report
from tasks.systems import BenchCell, run_bench_cell

HUB_GSM8K_WORKLOAD = ("hf:" + GSM8K_HUB + ",subset=main,split=test,template=Question: {question}\\nAnswer:,"
                      "answer=answer")


def hub_workload(spec: str) -> str:
    """A `gsm8k[,k=v...]` bench workload over the hub's openai/gsm8k instead of the local files."""
    head, _, rest = spec.partition(",")
    if head.strip() != "gsm8k":
        return spec
    keep = [kv for kv in rest.split(",") if kv.split("=")[0].strip() in ("n", "gen", "ignore_eos")] if rest else []
    return ",".join([HUB_GSM8K_WORKLOAD, *keep])


def uses_gsm8k(tasks: list[str], workload: str) -> bool:
    """Whether the run reads the local GSM8K files: a local lm-eval task or the `gsm8k` workload."""
    return bool(set(tasks) & set(LOCAL_TASKS)) or workload_kind(workload) == "gsm8k"


def check_baseline(baseline: str, systems: list[str]) -> None:
    if baseline not in systems:
        raise ConfigError(f"baseline {baseline!r} must be one of the systems {systems}")


def summary_rows(rows: list[dict]) -> list[dict]:
    return [{"system": r["system"], "bench_system": r["bench_system"], "metrics": r["metrics"],
             "ratios": r["ratios"]} for r in rows]


@flow(name="eval", description="lm-eval accuracy and bench throughput of each system on one model")
def eval_flow(model: ModelRef = "fixture:mixtral/smollm2",
              tasks: TaskNames = ["gsm8k_local"],  # noqa: B006
              systems: EvalSystemNames = ["moegen", "hf"],  # noqa: B006
              baseline: str = "hf", limit: PositiveInt | None = 16, num_fewshot: NonNegativeInt | None = None,
              max_gen_toks: PositiveInt | None = None, dtype: DType = "bfloat16", eval_dtype: DType | None = None,
              device: Device = "cpu",
              engine: EngineOptions = EngineOptions(),
              bench_systems: OptionalSystemNames = ["moegen", "hf-generate"],  # noqa: B006
              bench_workload: WorkloadSpec = "gsm8k,n=16,gen=32", bench_repeat: PositiveInt = 1,
              bench_options: dict[str, dict] = {},  # noqa: B006
              probe: ProbeMode = "quick", usd_per_hour: PositiveFloat | None = None,
              results_url: ResultsURL = None, tags: list[str] = [],  # noqa: B006
              resume_from: str | None = None) -> dict:
    """Evaluate `model` on lm-eval `tasks` with each backend in `systems`, measure the throughput of
    `bench_systems` on `bench_workload`, record both, and report them side by side against `baseline`.
    eval_dtype: the accuracy runs' dtype (default: dtype, the throughput runs'); in float32 moegen is
    token-identical to transformers, so its answers must equal the hf backend's, and the summary says
    whether they do."""
    check_resume_limit()
    check_baseline(baseline, systems)
    options = system_options(engine, bench_options, bench_systems)
    scope = cache_scope(resume_from)
    model_path = prepare_model(model)
    if uses_gsm8k(tasks, bench_workload) and not resolve_gsm8k(splits=GSM8K_SPLITS)["local"]:
        tasks, bench_workload = hub_task_names(tasks), hub_workload(bench_workload)
    evals = [run_lm_eval(EvalSpec(model_path=model_path, tasks=tasks, system=system, limit=limit,
                                  num_fewshot=num_fewshot, dtype=eval_dtype or dtype, device=device,
                                  max_gen_toks=max_gen_toks,
                                  engine_options=engine.set_options() if system == "moegen" else None), scope)
             for system in systems]
    bench = [run_bench_cell(BenchCell(model_path=model_path, system=system, workload=bench_workload,
                                      repeat=bench_repeat, dtype=dtype, device=device, options=options.get(system),
                                      probe=probe, usd_per_hour=usd_per_hour), scope) for system in bench_systems]
    cells = compute_bench_table(bench, EVAL_TO_BENCH.get(baseline, baseline)) if bench else []
    rows = compute_eval_table(evals, cells, baseline)
    environment = environment_of(bench[0]) if bench else describe_environment(device)
    run_id = record_eval_run(model, evals, cells, environment, tags, flow_run_id(), results_url)
    notes = [f"model `{model}` ({model_path})", f"tasks {', '.join(tasks)}; limit {limit}; "
             f"num_fewshot {num_fewshot if num_fewshot is not None else 'task default'}",
             f"throughput: {', '.join(bench_systems) or 'not measured'} on `{bench_workload}`"]
    report = render_report("eval", f"eval: {model}", rows, baseline, str(report_dir("eval", results_url)),
                           run_id, notes)
    return {"run_id": run_id, "model": model, "model_path": model_path, "tasks": tasks, "baseline": baseline,
            "bench_workload": bench_workload, "dtype": dtype, "eval_dtype": eval_dtype or dtype,
            "rows": summary_rows(rows), "report": report}


def show_eval(summary: dict) -> None:
    """The comparison table on the terminal, then what it says in words."""
    from rich.table import Table

    from moegen.console import make_console
    from moegen.results.metrics import label
    from tasks.report import fmt
    base = summary["baseline"]
    accuracy = sorted({k for r in summary["rows"] for k in r["metrics"] if k.startswith("accuracy.")})
    columns = [*accuracy, "answers_differ", "e2e_tokens_per_s", "decode_tokens_per_s"]
    table = Table(title=f"eval run {summary['run_id']}: {summary['model']}")
    for name in ["system", "bench system", *columns, f"e2e tok/s vs {base}"]:
        shown = f"answers != {base}'s" if name == "answers_differ" else label(name)
        table.add_column(shown, justify="left" if "system" in name else "right")
    for r in summary["rows"]:
        table.add_row(r["system"], r["bench_system"], *(fmt(r["metrics"].get(c)) for c in columns),
                      fmt(r["ratios"].get("e2e_tokens_per_s")))
    console = make_console()
    console.print(table)
    for line in eval_findings(summary):
        console.print(line)
    console.print(f"report: {summary['report']['report']}")


def eval_findings(summary: dict) -> list[str]:
    """The summary lines: answers against the baseline's in the accuracy dtype (in float32 they
    must be identical, and the line says whether they are), and throughput in the bench dtype
    with the number of questions whose greedy answers differ there (not an accuracy ratio)."""
    base, lines = summary["baseline"], []
    base_m = next((b["metrics"] for b in summary["rows"] if b["system"] == base), {})
    eval_dtype, dtype = summary.get("eval_dtype", "?"), summary.get("dtype", "?")
    for r in summary["rows"]:
        m = r["metrics"]
        if r["system"] == base or m.get("questions") is None:
            continue
        accuracy = ", ".join(f"{k.removeprefix('accuracy.')} {m[k]:.3f}" for k in sorted(m)
                             if k.startswith("accuracy.") and m[k] is not None)
        base_accuracy = ", ".join(f"{base_m[k]:.3f}" for k in sorted(base_m) if k.startswith("accuracy.")
                                  and base_m[k] is not None)
        same = m["answers_differ"] == 0
        verdict = (f"identical answers on all {m['questions']} questions" if same
                   else f"answers differ on {m['answers_differ']} of {m['questions']} questions")
        if eval_dtype in ("float32", "fp32"):
            verdict += " (expected: token-identical in float32; checked)" if same else \
                " -- NOT as expected: float32 answers must be identical"
        lines.append(f"accuracy in {eval_dtype}: {r['system']} {accuracy} vs {base} {base_accuracy}: {verdict}")
    for r in summary["rows"]:
        m, ratio = r["metrics"], r["ratios"].get("e2e_tokens_per_s")
        if r["system"] == base or ratio is None:
            continue
        # each bench system is compared with the workload's first one: of the pair, one holds the count
        differ = [x.get("sequences_differ") for x in (m, base_m) if x.get("sequences_differ") is not None]
        flipped = "" if len(differ) < 2 else (
            f"; the two systems' greedy answers differ on {max(differ)} of {m.get('sequences_compared')} questions "
            f"({dtype} rounding flips near-ties: reported, not turned into an accuracy ratio)")
        lines.append(f"throughput in {dtype}: {r['bench_system']} generates {ratio:.2f}x the tokens per second of "
                     f"{base}'s throughput system on {summary['bench_workload']} (end to end, prefill included, "
                     f"same prompts and greedy settings){flipped}. Module batching runs each expert once per layer "
                     "over every token routed to it, where a padded static batch runs it per batch.")
    return lines


if __name__ == "__main__":
    from flows.cli import run_flow_from_argv
    run_flow_from_argv(eval_flow, show=show_eval)
