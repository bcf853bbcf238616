"""`moegen bench` and run_bench: the documented JSON, agreement and ratios, errors before any work."""
import argparse
import contextlib
import io
import json

import pytest

import moegen.bench.run
from moegen.bench.run import agreement, compare_tokens, run_bench
from moegen.cli.bench import add_subparser, options_of, parse_opt, prediction_line
from moegen.errors import ConfigError, DTypeError, InputError
from moegen.bench.systems import RunResult
from moegen.bench.systems.peaks import probed_peaks
from moegen.jsonl import json_safe

TOP_KEYS = {"schema", "created_at", "config", "hardware", "versions", "git", "baseline", "agreement", "systems"}
ROW_KEYS = {"system", "description", "status", "reason", "metrics", "config", "ratios"}
FAKE_PROBE = {"device": "cpu", "quick": True, "cached": True, "measured_at": "now", "host_mem_bw_gbps": 20.0,
              "gemm_best_flops_per_s": {"float32": 5e10, "bfloat16": 1e11, "float16": 1e9}}


def parser():
    ap = argparse.ArgumentParser(prog="moegen")
    add_subparser(ap.add_subparsers(dest="command", required=True))
    return ap


def bench_args(model, *extra):
    return parser().parse_args(["bench", "--model", str(model), *extra])


@pytest.fixture(scope="module")
def model(tiny_fixture):
    return tiny_fixture("mixtral")


@pytest.fixture(scope="module")
def cli_report(model, tmp_path_factory):
    """One real run through the CLI: moegen, the HF baseline, and a system that cannot run here."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    mp = pytest.MonkeyPatch()
    # measured peaks without measuring; the engine's own planner is not involved (G, A fixed below)
    mp.setattr(moegen.bench.run, "hardware_peaks", lambda device, dtype, mode: (probed_peaks(FAKE_PROBE, device, dtype),
                                                                            dict(FAKE_PROBE)))
    try:
        args = bench_args(model, "--systems", "moegen,hf-offload,hf-generate", "--workload",
                          "synthetic:prompt=12,gen=4,n=3", "--dtype", "float32", "--usd-per-hour", "1.8",
                          "--opt", "moegen.kv_cache_memory=16MB", "--opt", "moegen.max_batch=8",
                          "--opt", "moegen.attn_micro_batch=2", "--opt", "moegen.max_prefill_tokens=4096",
                          "--opt", "hf-generate.batch_size=2", "--outputs", "--json", str(out))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            args.func(args)
    finally:
        mp.undo()
    return json.loads(out.read_text()), printed.getvalue()


def test_json_has_the_documented_keys(cli_report):
    report, _ = cli_report
    assert set(report) == TOP_KEYS and report["schema"] == 1
    assert report["config"]["systems"] == ["moegen", "hf-offload", "hf-generate"]
    assert report["config"]["workload"]["num_prompts"] == 3 and report["config"]["dtype"] == "float32"
    assert report["config"]["options"]["hf-generate"] == {"batch_size": 2}
    assert report["hardware"]["peaks"] == {"flops_per_s": 5e10, "bw_gbps": 20.0, "source": "probe (cached), quick"}
    assert report["hardware"]["cpu"]["count"] >= 1 and report["hardware"]["gpu"] is None
    assert report["versions"]["torch"] and report["versions"]["moegen"]
    assert set(report["git"]) == {"commit", "dirty"}
    rows = {r["system"]: r for r in report["systems"]}
    for row in rows.values():
        assert ROW_KEYS | {"outputs"} == set(row)
    assert rows["hf-offload"]["status"] == "skipped" and "CUDA" in rows["hf-offload"]["reason"]
    for name in ("moegen", "hf-generate"):
        m = rows[name]["metrics"]
        assert rows[name]["status"] == "ok" and m["generated_tokens"] == 12
        assert m["total_s_mfu"] > 0 and m["decode_s_mbu"] > 0 and m["usd_per_million_tokens"] > 0
        assert [len(o["token_ids"]) for o in rows[name]["outputs"]] == [4, 4, 4]
    assert rows["hf-generate"]["config"]["batch_size"] == 2


def test_agreement_and_ratios_against_the_first_baseline(cli_report):
    report, printed = cli_report
    a = report["agreement"]
    assert a["reference"] == "moegen" and a["exact_required"] and a["ok"]
    assert a["systems"]["hf-generate"]["sequence_agreement"] == 1.0
    assert a["systems"]["hf-generate"]["first_divergence"] is None
    assert report["baseline"] == "hf-generate"       # the first non-moegen system that ran
    rows = {r["system"]: r for r in report["systems"]}
    assert rows["hf-generate"]["ratios"]["e2e_tokens_per_s"] == 1.0
    m, base = rows["moegen"]["metrics"], rows["hf-generate"]["metrics"]
    expected = m["e2e_tokens_per_s"] / base["e2e_tokens_per_s"]
    assert rows["moegen"]["ratios"]["e2e_tokens_per_s"] == pytest.approx(expected)
    assert rows["hf-offload"]["ratios"] is None
    assert "greedy agreement vs moegen: hf-generate 3/3 sequences" in printed
    assert "exact match required: OK" in printed and "hf-offload skipped: needs a CUDA device" in printed


def test_compare_tokens_reports_the_first_divergence():
    cmp = compare_tokens([[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 3], [4, 9, 6], [7, 8, 0]])
    assert cmp["sequences_equal"] == 1 and cmp["sequence_agreement"] == pytest.approx(1 / 3)
    assert cmp["first_divergence"] == {"prompt": 1, "position": 1, "reference_token": 5, "token": 9}
    assert cmp["token_agreement"] == pytest.approx((3 + 1 + 2) / (3 + 3 + 3))


def test_float32_mismatch_fails_agreement_but_inexact_systems_do_not():
    ref = RunResult("moegen", [[1, 2]], [""], {}, {})
    other = RunResult("hf-generate", [[1, 3]], [""], {}, {})
    assert not agreement([ref, other], "float32")["ok"]
    assert agreement([ref, other], "bfloat16")["ok"]              # bf16 batching may flip near-ties
    assert agreement([ref, RunResult("vllm", [[1, 3]], [""], {}, {})], "float32")["ok"]


def test_a_failing_system_is_recorded_and_the_rest_still_run(model, monkeypatch):
    from moegen.bench.systems.hf_generate import HFGenerateSystem

    def broken(self, handle, workload):
        raise RuntimeError("out of memory (test)")
    monkeypatch.setattr(HFGenerateSystem, "generate", broken)
    report = run_bench(model, "hf-generate", "synthetic:prompt=4,gen=2,n=1", dtype="float32", probe="off")
    row = report["systems"][0]
    assert row["status"] == "failed" and "RuntimeError: out of memory (test)" in row["reason"]
    assert report["baseline"] is None and report["agreement"]["reference"] is None


@pytest.mark.parametrize("extra, error, message", [
    (["--systems", "moegen,tgi"], InputError, "unknown system 'tgi'; known systems: moegen,"),
    (["--systems", "moegen,moegen"], InputError, "named twice"),
    (["--opt", "hf-generate.batch_size=2"], InputError, "not in the run: hf-generate"),
    (["--opt", "moegen.colour=red"], InputError, "unknown option.*colour"),
    (["--workload", "shakespeare:n=2"], InputError, "unknown kind 'shakespeare'"),
    (["--workload", "synthetic:prompt=x"], InputError, "is not an integer"),
    (["--dtype", "int3"], DTypeError, "unknown dtype"),
    (["--repeat", "0"], InputError, "repeat must be"),
])
def test_cli_errors_before_any_run(model, extra, error, message):
    argv = ["--systems", "moegen", "--workload", "synthetic:prompt=4,gen=2,n=1", "--probe", "off"]
    args = bench_args(model, *argv, *extra)
    with pytest.raises(error, match=message):
        args.func(args)


def test_a_config_name_needs_dummy_weights():
    with pytest.raises(ConfigError, match="not a checkpoint directory.*--dummy-weights"):
        run_bench("mixtral-8x7b", "moegen", "synthetic:prompt=4,gen=2,n=1", probe="off")


def test_dummy_weights_run_moegen_only(model):
    fixed = {"kv_cache_memory": "16MB", "max_batch": 4, "attn_micro_batch": 2, "max_prefill_tokens": 4096}
    report = run_bench(model, "moegen,hf-generate", "synthetic:prompt=6,gen=3,n=2", dtype="float32",
                       dummy_weights=True, probe="off", options={"moegen": fixed})
    rows = {r["system"]: r for r in report["systems"]}
    assert report["config"]["model_kind"] == "config" and report["config"]["dummy_weights"]
    assert rows["moegen"]["status"] == "ok" and rows["moegen"]["metrics"]["generated_tokens"] == 6
    assert rows["hf-generate"]["status"] == "skipped"
    assert "needs a checkpoint with weights" in rows["hf-generate"]["reason"]


def test_opt_parsing():
    assert parse_opt("hf-generate.batch_sizes=[16,64]") == ("hf-generate", "batch_sizes", [16, 64])
    assert parse_opt("moegen.host_memory=8GB") == ("moegen", "host_memory", "8GB")
    assert options_of(["moegen.max_batch=64", "moegen.streaming=\"staged\""]) == \
        {"moegen": {"max_batch": 64, "streaming": "staged"}}
    with pytest.raises(InputError, match="SYSTEM.KEY=VALUE"):
        parse_opt("batch_size=4")


def test_json_safe_drops_non_finite_numbers():
    assert json_safe({"a": float("inf"), "b": (1, 2.5), "c": float("nan")}) == {"a": None, "b": [1, 2.5], "c": None}


def test_json_safe_turns_numpy_and_torch_values_into_numbers():
    import numpy as np
    import torch
    assert json_safe({"f": np.float32(0.5), "i": np.int64(3), "t": torch.tensor([1, 2]), "n": np.float64("nan")}) == \
        {"f": 0.5, "i": 3, "t": [1, 2], "n": None}


def test_prediction_line_puts_the_plan_beside_the_measurement():
    m = {"predicted_e2e_tokens_per_s": 660.0, "predicted_prefill_tokens_per_s": 2000.0,
         "predicted_decode_tokens_per_s": 1500.0, "predicted_bound": "compute", "e2e_tokens_per_s": 600.0}
    assert prediction_line({"system": "moegen", "status": "ok", "metrics": m}) == (
        "moegen: planner predicted 660 e2e tok/s (prefill 2,000, decode 1,500, compute-bound), measured 600: +10%")
    unplanned = {**m, "predicted_e2e_tokens_per_s": None}      # every setting fixed: nothing predicted
    assert prediction_line({"system": "moegen", "status": "ok", "metrics": unplanned}) == ""
    assert prediction_line({"system": "hf-generate", "status": "ok", "metrics": {"e2e_tokens_per_s": 1.0}}) == ""
