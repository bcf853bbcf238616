"""Flow `bench`: systems × workloads on one model, every metric, and the nightly regression check.

    python -m flows.bench 'workloads=["synthetic:prompt=128,gen=32,n=64"]'
    python -m flows.bench nightly=true 'runner={"kind": "ray", "gpus_per_cell": 1}' device=cuda

The matrix's cells run in the subflow `bench-matrix` on the task runner the `runner` parameter
picks: Prefect's ThreadPoolTaskRunner (default, one cell at a time so that no two measurements
share the machine) or prefect-ray's RayTaskRunner (extra `cluster`), each cell reserving
`gpus_per_cell` GPUs. With nightly=true (repeat >= 3: each figure is the median pass) each figure
is compared with the median of the last 5 healthy nightlies of the same (model, system, workload,
hardware): a drop beyond regression_threshold *and* beyond the noise those nightlies (and this
run's passes) showed fails the flow run, with a markdown artifact naming the figures that fell;
a regressed nightly is recorded as such and never joins the baseline. The report plots each
headline figure over the last nightlies.
"""
from __future__ import annotations

import contextlib
import os

from prefect import flow, unmapped
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import PositiveFloat, PositiveInt

from flows.common import cache_scope, check_resume_limit, flow_run_id, report_dir, system_options
from flows.eval import check_baseline
from flows.params import (DType, Device, EngineOptions, ModelRef, ProbeMode, ResultsURL, SystemNames, TaskRunnerChoice,
                          Threshold, WorkloadSpecs)
from moegen.errors import ConfigError
from tasks.metrics import DEFAULT_REGRESSION_METRICS, compute_bench_table, find_regressions
from tasks.models import prepare_model
from tasks.record import environment_of, record_bench_run
from tasks.report import nightly_trend, render_report, report_regressions

MIN_NIGHTLY_REPEAT = 3       # one pass on a shared machine swings by tens of percent; the median of 3 does not


class NightlyRegression(Exception):
    """What a regressed nightly's Failed state holds: the message, and the run's summary."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary

    def __reduce__(self):             # picklable with its summary, as Prefect may persist state data
        return type(self), (str(self), self.summary)
from tasks.systems import BenchCell, run_bench_cell


def make_task_runner(choice: TaskRunnerChoice):
    """The task runner the bench-matrix subflow maps its cells on."""
    if choice.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=choice.max_workers)
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise ConfigError("runner kind 'ray' needs prefect-ray: pip install 'moegen[cluster]'") from None
    init_kwargs = {"include_dashboard": False} if choice.ray_address is None else {}
    return RayTaskRunner(address=choice.ray_address, init_kwargs=init_kwargs)


def ray_resources(choice: TaskRunnerChoice, device: str) -> dict:
    """What each cell reserves on Ray: its GPUs (one by default on CUDA), and on a local Ray all the
    CPUs, so that two measurements never share the machine."""
    gpus = choice.gpus_per_cell or (1 if device.startswith("cuda") else 0)
    cpus = choice.cpus_per_cell or (os.cpu_count() if choice.ray_address is None else 1)
    return {"num_gpus": gpus, "num_cpus": cpus}


def cell_resources(choice: TaskRunnerChoice, device: str):
    if choice.kind != "ray":
        return contextlib.nullcontext()
    from prefect_ray.context import remote_options
    return remote_options(**ray_resources(choice, device))


@flow(name="bench-matrix", description="one bench cell per (system, workload), mapped on the task runner")
def bench_matrix_flow(cells: list[BenchCell], scope: str, runner: TaskRunnerChoice) -> list[dict]:
    with cell_resources(runner, cells[0].device if cells else "cpu"):
        futures = run_bench_cell.map(cells, unmapped(scope))
    return [future.result() for future in futures]


@flow(name="bench", description="systems x workloads on one model; nightly regression check")
def bench_flow(model: ModelRef = "fixture:mixtral/bench",
               systems: SystemNames = ["moegen", "hf-generate"],  # noqa: B006
               workloads: WorkloadSpecs = ["synthetic:prompt=128,gen=32,n=64"],  # noqa: B006
               baseline: str = "hf-generate", repeat: PositiveInt = 1, dtype: DType = "bfloat16",
               device: Device = "cpu", engine: EngineOptions = EngineOptions(),
               options: dict[str, dict] = {},  # noqa: B006
               probe: ProbeMode = "quick", usd_per_hour: PositiveFloat | None = None,
               runner: TaskRunnerChoice = TaskRunnerChoice(), nightly: bool = False,
               regression_threshold: Threshold = 0.10,
               regression_metrics: list[str] = list(DEFAULT_REGRESSION_METRICS),  # noqa: B006
               results_url: ResultsURL = None, tags: list[str] = [],  # noqa: B006
               resume_from: str | None = None):
    """Measure every system on every workload, record the matrix, report it against `baseline`;
    with nightly=true, fail on a regression beyond regression_threshold."""
    check_resume_limit()
    check_baseline(baseline, systems)
    if nightly and repeat < MIN_NIGHTLY_REPEAT:
        raise ConfigError(f"a nightly needs repeat >= {MIN_NIGHTLY_REPEAT} (its figures are the median pass), "
                          f"got repeat={repeat}")
    cell_options = system_options(engine, options, systems)
    scope = cache_scope(resume_from)
    model_path = prepare_model(model)
    matrix = bench_matrix_flow.with_options(task_runner=make_task_runner(runner))
    measured = [BenchCell(model_path=model_path, system=system, workload=workload, repeat=repeat, dtype=dtype,
                          device=device, options=cell_options.get(system), probe=probe, usd_per_hour=usd_per_hour)
                for workload in workloads for system in systems]
    docs = matrix(measured, scope, runner)
    cells = compute_bench_table(docs, baseline)
    regressions = find_regressions(cells, model, regression_threshold, regression_metrics,
                                   url=results_url) if nightly else []
    kind = "nightly" if nightly else "bench"
    run_id = record_bench_run(model, kind, cells, environment_of(docs[0]), tags,
                              "regressed" if regressions else "ok", flow_run_id(), results_url)
    notes = [f"model `{model}` ({model_path}); {dtype} on {device}; repeat {repeat}",
             f"{kind} run, task runner {runner.kind}"]
    trend = nightly_trend(model, list(regression_metrics), results_url) if nightly else None
    report = render_report("bench", f"{kind}: {model}", cells, baseline, str(report_dir("bench", results_url)),
                           run_id, notes, trend)
    summary = {"run_id": run_id, "kind": kind, "model": model, "baseline": baseline, "report": report,
               "cells": [{k: c[k] for k in ("system", "workload", "metrics", "ratios", "skipped_reason")}
                         for c in cells], "regressions": regressions}
    if regressions:
        report_regressions(regressions, regression_threshold, model)
        worst = max(regressions, key=lambda r: r["drop"])
        message = (f"{len(regressions)} figure(s) fell more than {regression_threshold:.0%} (and more than the "
                   f"baseline's noise) below the healthy nightlies; worst: {worst['system']} on {worst['workload']} "
                   f"{worst['metric']} -{100 * worst['drop']:.1f}%")
        # a Failed state's data must be an exception (a dict makes Prefect log a TypeError)
        return Failed(message=message, data=NightlyRegression(message, summary))
    return summary


if __name__ == "__main__":
    from flows.cli import run_flow_from_argv
    run_flow_from_argv(bench_flow)
