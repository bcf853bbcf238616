"""The harness's plain functions, without a Prefect API: ratios, regressions, the CAP radar's
scores, shard plans, fixture specs, command-line parameters, the retry rule."""
import math

import pytest
from prefect.states import Failed

from flows.cli import parse_params
from moegen.errors import ConfigError, InputError
from moegen.bench.ratios import ratio
from tasks import report
from tasks.common import retry_unless_bad_input
from flows.eval import eval_findings
from tasks.metrics import add_ratios, cell_regressions, compute_eval_table
from tasks.models import fixture_dir, parse_fixture_spec


def cell(system, e2e, usd=None, accuracy=None, workload="w"):
    return {"system": system, "workload": workload, "skipped_reason": None,
            "metrics": {"e2e_tokens_per_s": e2e, "usd_per_million_tokens": usd, "accuracy": accuracy}}


def test_ratios_are_against_the_baseline_of_the_same_workload_and_cost_is_inverted():
    rows = add_ratios([cell("moegen", 300.0, usd=1.0), cell("hf-generate", 100.0, usd=3.0),
                       cell("moegen", 50.0, workload="other")], baseline="hf-generate")
    assert rows[0]["ratios"] == {"e2e_tokens_per_s": 3.0, "usd_per_million_tokens": 3.0}
    assert rows[1]["ratios"]["e2e_tokens_per_s"] == 1.0
    assert rows[2]["ratios"] == {}                                  # no baseline ran on that workload


def test_a_ratio_is_unknown_where_a_figure_is_missing_or_the_division_undefined():
    assert ratio(0.0, 100.0, "e2e_tokens_per_s") == 0.0             # it ran, and produced nothing
    assert ratio(50.0, 0.0, "e2e_tokens_per_s") is None
    assert ratio(None, 1.0, "accuracy") is None
    assert ratio(0.0, 2.0, "usd_per_million_tokens") is None         # free is not infinitely better


def test_a_drop_beyond_the_threshold_is_a_regression_a_rise_in_cost_too():
    previous = {"runs": [7], "created_at": ["2026-01-01T02:00:00"],
                "metrics": {"e2e_tokens_per_s": [100.0], "usd_per_million_tokens": [1.0], "accuracy": [0.5]}}
    found = cell_regressions(cell("moegen", 85.0, usd=1.2, accuracy=0.5), previous, 0.10,
                             ("e2e_tokens_per_s", "usd_per_million_tokens", "accuracy"))
    assert [(r["metric"], round(r["drop"], 3)) for r in found] == [("e2e_tokens_per_s", 0.15),
                                                                   ("usd_per_million_tokens", 0.2)]
    assert cell_regressions(cell("moegen", 91.0), previous, 0.10, ("e2e_tokens_per_s",)) == []
    assert cell_regressions(cell("moegen", None), previous, 0.10, ("e2e_tokens_per_s",)) == []


def baseline_of(*values: float, spreads=()) -> dict:
    metrics = {"e2e_tokens_per_s": list(values)}
    if spreads:
        metrics["spread.e2e_tokens_per_s"] = list(spreads)
    return {"runs": list(range(1, len(values) + 1)), "created_at": ["2026-01-01T02:00:00"] * len(values),
            "metrics": metrics}


def test_a_regression_is_against_the_median_and_beyond_the_baselines_noise():
    e2e = ("e2e_tokens_per_s",)
    noisy = baseline_of(100.0, 70.0, 95.0, 105.0, 90.0)          # median 95; a healthy night fell 26% below it
    assert cell_regressions(cell("moegen", 75.0), noisy, 0.10, e2e) == []           # -21%: within the noise
    found = cell_regressions(cell("moegen", 60.0), noisy, 0.10, e2e)                # -37%: beyond it
    assert [(r["previous"], round(r["drop"], 3), round(r["spread"], 3)) for r in found] == [(95.0, 0.368, 0.263)]
    steady = baseline_of(100.0, 98.0, 101.0)
    assert [r["previous"] for r in cell_regressions(cell("moegen", 70.0), steady, 0.10, e2e)] == [100.0]   # -30%
    # the noise between the passes of one nightly counts as well (this run's or the baseline's)
    noisy_run = cell("moegen", 70.0)
    noisy_run["metrics"]["spread.e2e_tokens_per_s"] = 0.4
    assert cell_regressions(noisy_run, steady, 0.10, e2e) == []
    assert cell_regressions(cell("moegen", 70.0), baseline_of(100.0, spreads=[0.35]), 0.10, e2e) == []


def test_repeat_spreads_are_recorded_from_the_passes():
    from tasks.metrics import repeat_spreads
    spreads = repeat_spreads({"repeats_e2e_tokens_per_s": [100.0, 80.0, 104.0], "e2e_tokens_per_s": 100.0})
    assert spreads == {"spread.e2e_tokens_per_s": pytest.approx(0.2)}
    assert repeat_spreads({"repeats_e2e_tokens_per_s": [100.0]}) == {}


def test_cap_scores_put_the_best_system_at_one_and_cost_as_efficiency():
    labels, scores = report.cap_scores([cell("moegen", 200.0, usd=1.0, accuracy=0.5),
                                        cell("hf-generate", 100.0, usd=4.0, accuracy=0.25)])
    assert labels == ["A: accuracy", "P: e2e tok/s", "C: $/M tokens"]
    assert scores == {"moegen": [1.0, 1.0, 1.0], "hf-generate": [0.5, 0.5, 0.25]}
    labels, scores = report.cap_scores([cell("moegen", 10.0), cell("hf-generate", 0.0)])
    assert labels[0] == "A: accuracy (n/a)" and scores["hf-generate"] == [0.0, 0.0, 0.0]
    assert math.isclose(report.relative_score(2.0, [1.0, 4.0], lower_is_better=True), 0.5)


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda name: None)
    notes = []
    assert report.write_plots([cell("moegen", 1.0)], tmp_path, notes) == {}
    assert "matplotlib is not installed" in notes[0]


def test_plots_are_written(tmp_path):
    plots = report.write_plots([cell("moegen", 2.0, usd=1.0), cell("hf-generate", 1.0, usd=2.0)], tmp_path, [])
    assert set(plots) == {"throughput", "CAP radar"}
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in plots.values())


def test_fixture_specs():
    assert parse_fixture_spec("fixture:mixtral/bench") == {"arch": "mixtral", "preset": "bench", "seed": 0}
    assert fixture_dir(parse_fixture_spec("fixture:olmoe/tiny@3"), "runs/fixtures").as_posix() == \
        "runs/fixtures/olmoe-tiny-s3"
    assert parse_fixture_spec("/models/Mixtral-8x7B") is None
    with pytest.raises(ConfigError, match="use fixture:<arch>/<preset>"):
        parse_fixture_spec("fixture:mixtral")


def test_command_line_parameters():
    assert parse_params(["limit=4", "systems=[\"moegen\"]", "bench_workload=gsm8k,n=2", "num-fewshot=0"]) == \
        {"limit": 4, "systems": ["moegen"], "bench_workload": "gsm8k,n=2", "num_fewshot": 0}
    assert parse_params(['{"limit": 2}']) == {"limit": 2}
    with pytest.raises(InputError, match="is not key=value"):
        parse_params(["limit"])


def test_bad_input_is_never_retried():
    assert retry_unless_bad_input(None, None, Failed(data=RuntimeError("connection reset"))) is True
    assert retry_unless_bad_input(None, None, Failed(data=InputError("prompt 3 is empty"))) is False
    assert retry_unless_bad_input(None, None, Failed(data=ConfigError("bad config.json"))) is False


def test_flow_parameters_accept_what_the_engine_and_bench_accept():
    import typing

    from pydantic import ValidationError

    from flows.params import EngineOptions, ProbeMode
    from moegen.bench.systems.peaks import PROBE_MODES
    assert set(typing.get_args(ProbeMode)) == set(PROBE_MODES)
    for size in ("8GB", "512mb", "1.5g", "2GiB"):
        assert EngineOptions(host_memory=size).set_options() == {"host_memory": size}
    with pytest.raises(ValidationError, match="cannot read memory size"):
        EngineOptions(device_memory="lots")


def test_only_local_tasks_or_the_gsm8k_workload_need_the_local_files():
    from flows.eval import uses_gsm8k
    assert uses_gsm8k(["gsm8k_local"], "synthetic:prompt=8,gen=2,n=2")
    assert uses_gsm8k(["other"], "gsm8k:/data,n=8")
    assert not uses_gsm8k(["gsm8k_cot"], "hf:openai/gsm8k,field=question")   # hub task and workload


def test_unknown_task_names_are_refused_with_the_parameters():
    """Before any work (the eval flow validates its parameters first), not inside its lm-eval task."""
    from pydantic import TypeAdapter, ValidationError

    from flows.params import TaskNames
    assert TypeAdapter(TaskNames).validate_python(["gsm8k_local"]) == ["gsm8k_local"]
    with pytest.raises(ValidationError, match="unknown task 'gsm8k_locl' \\(did you mean gsm8k_local"):
        TypeAdapter(TaskNames).validate_python(["gsm8k_locl"])


def test_the_flows_sampling_is_the_engines():
    """Every field of flows' Sampling is a SamplingParams field with the same default, so a flow
    can ask for whatever `moegen generate` can (n samples, logprobs)."""
    from dataclasses import fields

    from flows.params import Sampling
    from moegen.engine.params import SamplingParams
    engine = {f.name: f for f in fields(SamplingParams)}
    assert {"n", "logprobs", "prompt_logprobs"} <= set(Sampling.model_fields)
    for name, value in Sampling().model_dump().items():
        assert name in engine
        default = engine[name].default_factory() if callable(engine[name].default_factory) else engine[name].default
        assert value == default, name
    SamplingParams(**Sampling(n=3, logprobs=2).model_dump())


def eval_doc(system: str, answers: list, options: list[list[float]]) -> dict:
    """An lm-eval result with a generation task `gen` and a multiple-choice task `mc`."""
    return {"system": system, "tasks": ["gen", "mc"], "wall_s": 1.0,
            "results": {"gen": {"exact_match,strict-match": 0.5}, "mc": {"acc,none": 0.5}},
            "samples": {"gen": [{"doc_id": i, "filter": "strict-match", "filtered_response": a}
                                for i, a in enumerate(answers)],
                        "mc": [{"doc_id": i, "filter": "none", "filtered_response": [[ll, False] for ll in lls]}
                               for i, lls in enumerate(options)]}}


def test_backends_are_compared_by_their_answers_not_an_accuracy_ratio():
    base = eval_doc("hf", ["4", "7"], [[-1.0, -2.0], [-3.0, -0.5]])
    same = eval_doc("moegen", ["4", "7"], [[-1.1, -2.2], [-3.1, -0.4]])      # other scores, same choices
    flipped = eval_doc("moegen", ["4", "8"], [[-2.0, -1.0], [-3.0, -0.5]])
    rows = {r["system"]: r for r in compute_eval_table.fn([base, same], [], "hf")}
    assert (rows["moegen"]["metrics"]["questions"], rows["moegen"]["metrics"]["answers_differ"]) == (4, 0)
    assert rows["hf"]["metrics"]["answers_differ"] == 0 and "accuracy" not in rows["moegen"]["ratios"]
    rows = {r["system"]: r for r in compute_eval_table.fn([base, flipped], [], "hf")}
    assert rows["moegen"]["metrics"]["answers_differ"] == 2
    summary = {"baseline": "hf", "eval_dtype": "float32", "dtype": "bfloat16", "bench_workload": "w",
               "rows": [{**r, "ratios": {}} for r in rows.values()]}
    assert "answers differ on 2 of 4 questions -- NOT as expected" in eval_findings(summary)[0]
    summary["rows"] = [{**r, "ratios": {}} for r in compute_eval_table.fn([base, same], [], "hf")]
    assert eval_findings(summary)[0].endswith("identical answers on all 4 questions (expected: token-identical in "
                                              "float32; checked)")
