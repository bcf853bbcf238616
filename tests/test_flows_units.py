"""The harness's plain functions, without a Prefect API: ratios, regressions, the CAP radar's
scores, shard plans, fixture specs, command-line parameters, the retry rule."""
import math

import pytest
from prefect.states import Failed

from flows.cli import parse_params
from moegen.errors import ConfigError, InputError
from tasks import report
from tasks.common import retry_unless_bad_input
from tasks.generate import plan_shards
from tasks.metrics import add_ratios, cell_regressions
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


def test_a_drop_beyond_the_threshold_is_a_regression_a_rise_in_cost_too():
    previous = {"run_id": 7, "created_at": "2026-01-01T02:00:00",
                "metrics": {"e2e_tokens_per_s": 100.0, "usd_per_million_tokens": 1.0, "accuracy": 0.5}}
    found = cell_regressions(cell("moegen", 85.0, usd=1.2, accuracy=0.5), previous, 0.10,
                             ("e2e_tokens_per_s", "usd_per_million_tokens", "accuracy"))
    assert [(r["metric"], round(r["drop"], 3)) for r in found] == [("e2e_tokens_per_s", 0.15),
                                                                   ("usd_per_million_tokens", 0.2)]
    assert cell_regressions(cell("moegen", 91.0), previous, 0.10, ("e2e_tokens_per_s",)) == []
    assert cell_regressions(cell("moegen", None), previous, 0.10, ("e2e_tokens_per_s",)) == []


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


def test_shards_cover_every_row_once():
    assert plan_shards(7, 3) == [(0, 0, 3), (1, 3, 6), (2, 6, 7)]
    assert plan_shards(6, 3) == [(0, 0, 3), (1, 3, 6)]


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
    from moegen.harness.systems.peaks import PROBE_MODES
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
