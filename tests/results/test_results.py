"""The results database: transactional writes, WAL, history, compare, previous nightly, the CLI."""
import argparse
import datetime as dt
import sqlite3

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from moegen.results import connection, queries, recording, schema
from moegen.cli.results import add_subparser
from moegen.results.recording import CellResult

HW = {"cpu": {"model": "Test CPU", "count": 2}, "gpu": None}


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'results' / 'moegen.db'}"


def ago(hours: float) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours)


def nightly(url, e2e, hours_ago, model="m", system="moegen", workload="w", hardware=HW, kind="nightly", skipped=None):
    cell = CellResult(system, workload, {"e2e_tokens_per_s": e2e}, skipped_reason=skipped)
    return recording.record_run(model, kind, [cell], hardware=hardware, created_at=ago(hours_ago), url=url)


def system_doc(name, e2e):
    return {"system": name, "status": "ok", "reason": None, "config": {"dtype": "float32"}, "ratios": None,
            "metrics": {"e2e_tokens_per_s": e2e, "decode_tokens_per_s": e2e * 1.5, "accuracy": None,
                        "repeats_e2e_tokens_per_s": [e2e], "peaks_source": "none"}}


def bench_doc(e2e_moegen=200.0, e2e_hf=100.0):
    """Shaped like moegen.bench.run.run_bench's JSON (schema 1), one system failed."""
    return {"schema": 1, "config": {"model": "/ckpt", "workload": {"spec": "synthetic:prompt=8,gen=2,n=2",
                                                                   "name": "synthetic-p8-g2-n2"}},
            "hardware": HW, "versions": {"torch": "2.13.0"}, "git": {"commit": "abc123", "dirty": False},
            "systems": [system_doc("moegen", e2e_moegen), system_doc("hf-generate", e2e_hf),
                        {"system": "vllm", "status": "skipped", "reason": "needs CUDA", "metrics": {}, "config": {}}]}


def count(url, model) -> int:
    with Session(connection.get_engine(url)) as session:
        return session.scalar(select(func.count()).select_from(model))


def test_record_and_read_back_a_run(url):
    run_id = recording.record_run("m", "bench", [CellResult("moegen", "w", {"e2e_tokens_per_s": 10, "nested": {"x": 2}},
                                                            config={"g": 64})],
                                  hardware=HW, versions={"torch": "2.13"}, git_commit="abc", tags=["t1"], url=url)
    run = queries.get_run(run_id, url)
    assert run["hardware"] == "Test CPU x2" and run["git_commit"] == "abc" and run["tags"] == ["t1"]
    assert run["results"] == [{"system": "moegen", "workload": "w", "config": {"g": 64}, "skipped_reason": None,
                               "metrics": {"e2e_tokens_per_s": 10.0, "nested.x": 2.0}}]
    assert [r["id"] for r in queries.history(tag="t1", url=url)] == [run_id]
    assert queries.history(tag="t2", url=url) == []


def test_sqlite_runs_in_wal_mode(url, tmp_path):
    recording.record_run("m", "bench", [], hardware=HW, url=url)
    with sqlite3.connect(tmp_path / "results" / "moegen.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


class Exploding:
    def __float__(self):
        raise RuntimeError("crash in the middle of the write")


def test_a_failure_mid_write_leaves_nothing(url):
    recording.record_run("m", "bench", [], hardware=HW, url=url)            # the schema and one good run
    cells = [CellResult("moegen", "w1", {"a": 1.0, "b": 2.0}), CellResult("hf-generate", "w2", {"a": Exploding()})]
    with pytest.raises(RuntimeError, match="crash in the middle"):
        recording.record_run("m", "bench", cells, hardware={"cpu": {"model": "Other"}}, url=url)
    assert count(url, schema.Run) == 1
    assert count(url, schema.Result) == count(url, schema.Metric) == 0
    assert count(url, schema.SystemRow) == count(url, schema.WorkloadRow) == 0
    assert count(url, schema.Environment) == 1


def test_record_bench_reads_the_bench_json(url):
    run_id = recording.record_bench(bench_doc(), kind="nightly", tags=["ci"], url=url)
    run = queries.get_run(run_id, url)
    assert run["model"] == "/ckpt" and run["kind"] == "nightly" and run["git_commit"] == "abc123"
    cells = {c["system"]: c for c in run["results"]}
    assert cells["moegen"]["workload"] == "synthetic:prompt=8,gen=2,n=2"
    assert cells["moegen"]["metrics"] == {"e2e_tokens_per_s": 200.0, "decode_tokens_per_s": 300.0, "accuracy": None}
    assert cells["vllm"]["skipped_reason"] == "skipped: needs CUDA" and cells["vllm"]["metrics"] == {}


def test_record_eval_keeps_each_task_metric(url):
    evaluation = {"system": "hf", "model": "/ckpt", "limit": 2, "num_fewshot": 0,
                  "results": {"gsm8k_local": {"alias": "gsm8k_local", "exact_match,strict-match": 0.5,
                                              "exact_match_stderr,strict-match": 0.1}}}
    run = queries.get_run(recording.record_eval(evaluation, url=url), url)
    assert run["kind"] == "eval"
    assert run["results"][0]["system"] == "hf" and run["results"][0]["config"] == {"limit": 2, "num_fewshot": 0}
    assert run["results"][0]["metrics"] == {"exact_match.strict-match": 0.5, "exact_match_stderr.strict-match": 0.1}


def test_bad_records_are_refused(url):
    with pytest.raises(connection.ResultsError, match="run kind must be one of"):
        recording.record_run("m", "weekly", [], url=url)
    with pytest.raises(connection.ResultsError, match="no 'systems' list"):
        recording.record_bench({"config": {"model": "m", "workload": {"spec": "w"}}}, url=url)
    with pytest.raises(connection.ResultsError, match="no run 42"):
        queries.get_run(42, url)


def test_history_newest_first_with_filters(url):
    old = nightly(url, 1.0, hours_ago=48)
    new = nightly(url, 2.0, hours_ago=1, system="hf-generate")
    other = nightly(url, 3.0, hours_ago=2, model="other", kind="bench")
    assert [r["id"] for r in queries.history(url=url)] == [new, other, old]
    assert [r["id"] for r in queries.history(last=1, url=url)] == [new]
    assert [r["id"] for r in queries.history(kind="nightly", url=url)] == [new, old]
    assert [r["id"] for r in queries.history(system="moegen", model="m", url=url)] == [old]
    assert [r["id"] for r in queries.history(hardware="Test CPU x2", workload="w", url=url)] == [new, other, old]


def test_compare_matches_cells_metric_by_metric(url):
    a = recording.record_bench(bench_doc(200.0, 100.0), url=url)
    b = recording.record_bench(bench_doc(150.0, 100.0), url=url)
    rows = {(r["system"], r["metric"]): r for r in queries.compare(a, b, url)}
    assert rows[("moegen", "e2e_tokens_per_s")]["ratio"] == pytest.approx(0.75)
    assert rows[("hf-generate", "e2e_tokens_per_s")]["ratio"] == pytest.approx(1.0)
    assert rows[("moegen", "accuracy")]["ratio"] is None


def test_nightly_baseline_is_the_latest_of_the_same_model_system_workload_hardware(url):
    older = nightly(url, 100.0, hours_ago=72)
    latest = nightly(url, 90.0, hours_ago=24)
    nightly(url, 500.0, hours_ago=1, kind="bench")                               # not a nightly
    nightly(url, 500.0, hours_ago=1, hardware={"gpu": {"name": "NVIDIA H100"}})  # other hardware
    nightly(url, 500.0, hours_ago=1, workload="w2")                              # other workload
    nightly(url, 500.0, hours_ago=1, model="m2")                                 # other model
    nightly(url, None, hours_ago=0.5, skipped="failed: OOM")                     # did not run
    found = queries.nightly_baseline("m", "moegen", "w", HW, last=1, url=url)
    assert found["runs"] == [latest] and found["metrics"] == {"e2e_tokens_per_s": [90.0]}
    assert queries.nightly_baseline("m", "moegen", "w", HW, last=1, before_run=latest, url=url)["runs"] == [older]
    assert queries.nightly_baseline("m", "hf-generate", "w", HW, url=url) is None
    assert queries.nightly_baseline("m", "moegen", "w", "NVIDIA H100", url=url)["metrics"]["e2e_tokens_per_s"] == [500]
    both = queries.nightly_baseline("m", "moegen", "w", HW, url=url)          # newest first
    assert both["runs"] == [latest, older] and both["metrics"]["e2e_tokens_per_s"] == [90.0, 100.0]


def test_nightly_baseline_keeps_the_last_healthy_runs_only(url):
    healthy = [nightly(url, 100.0 + i, hours_ago=100 - i) for i in range(7)]
    cell = CellResult("moegen", "w", {"e2e_tokens_per_s": 50.0})
    regressed = recording.record_run("m", "nightly", [cell], hardware=HW, status="regressed", created_at=ago(1),
                                     url=url)
    found = queries.nightly_baseline("m", "moegen", "w", HW, url=url)
    assert regressed not in found["runs"] and found["runs"] == healthy[::-1][:queries.BASELINE_NIGHTLIES]
    assert found["metrics"]["e2e_tokens_per_s"] == [106.0, 105.0, 104.0, 103.0, 102.0]


def test_nightly_series_is_the_trend_oldest_first(url):
    first, second = nightly(url, 100.0, hours_ago=48), nightly(url, 80.0, hours_ago=24)
    nightly(url, 70.0, hours_ago=1, kind="bench")
    series = queries.nightly_series("m", "e2e_tokens_per_s", url=url)
    assert list(series) == [("moegen", "w", recording.hardware_label(HW))]
    points = series[("moegen", "w", recording.hardware_label(HW))]
    assert [(v, s) for _, v, s in points] == [(100.0, "ok"), (80.0, "ok")]
    assert first < second


def test_url_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(connection.URL_ENV, f"sqlite:///{tmp_path / 'env.db'}")
    run_id = recording.record_run("m", "generate", [], hardware="box")
    assert queries.get_run(run_id)["hardware"] == "box"
    assert (tmp_path / "env.db").is_file()
    assert connection.reports_dir() == tmp_path / "reports"
    monkeypatch.delenv(connection.URL_ENV)
    assert connection.resolve_url().endswith("results/moegen.db")


def test_hardware_label():
    assert recording.hardware_label(HW) == "Test CPU x2"
    hardware = {"cpu": {"model": "X", "count": 8}, "gpu": {"name": "NVIDIA H100"}}
    assert recording.hardware_label(hardware) == "NVIDIA H100"
    assert recording.hardware_label({"cpu_model": "Y", "cpu_count": 4}) == "Y x4"
    assert recording.hardware_label(None) == "unknown"


def run_cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="moegen")
    add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    args.func(args)
    return capsys.readouterr().out


def test_cli_history_and_compare(url, capsys):
    a = recording.record_bench(bench_doc(200.0, 100.0), url=url)
    b = recording.record_bench(bench_doc(150.0, 100.0), url=url)
    out = run_cli(["results", "--last", "5", "--db", url], capsys)
    assert "hf-generate" in out and "skipped: needs CUDA" in out and "Test CPU x2" in out
    out = run_cli(["results", "--compare", str(a), str(b), "--db", url], capsys)
    assert f"run {b} against run {a}" in out and "0.750" in out
    with pytest.raises(connection.ResultsError, match="no run 99"):
        run_cli(["results", "--compare", str(a), "99", "--db", url], capsys)
