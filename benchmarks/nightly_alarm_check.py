"""Does the nightly regression alarm mean something on this machine? Four real nightlies of the
`bench` flow into a fresh results database: two healthy ones (must not alarm), one with moegen
slowed by a smaller global batch (must alarm), one healthy again (must not alarm: it compares with
the healthy baseline, the regressed run is not part of it).

    python benchmarks/nightly_alarm_check.py --model runs/fixtures/mixtral-bench [--slow-batch 16]
"""
import argparse
import os
import tempfile

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", default="synthetic:prompt=64,gen=32,n=128")
    ap.add_argument("--slow-batch", type=int, default=16, help="max_batch of the slowed nightly")
    args = ap.parse_args()
    from flows.bench import bench_flow

    url = f"sqlite:///{tempfile.mkdtemp(prefix='nightly-check-')}/moegen.db"
    common = dict(model=args.model, systems=["moegen"], baseline="moegen", workloads=[args.workload],
                  nightly=True, repeat=3, probe="off", results_url=url, tags=["alarm-check"])
    runs = [("healthy 1", {}), ("healthy 2", {}), (f"slowed (max_batch={args.slow_batch})",
                                                   {"engine": {"max_batch": args.slow_batch}}), ("healthy 3", {})]
    for label, extra in runs:
        state = bench_flow(**common, **extra, return_state=True)
        summary = state.result(raise_on_failure=False)
        summary = getattr(summary, "summary", summary)
        metrics = summary["cells"][0]["metrics"]
        figures = "  ".join(f"{phase} {metrics.get(f'{phase}_tokens_per_s'):7.1f} tok/s "
                            f"(spread {100 * (metrics.get(f'spread.{phase}_tokens_per_s') or 0):4.1f}%)"
                            for phase in ("e2e", "prefill", "decode"))
        verdict = "ALARM: " + state.message if state.is_failed() else "ok"
        print(f"{label:28s} {figures}  -> {verdict}", flush=True)


if __name__ == "__main__":
    main()
