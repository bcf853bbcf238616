"""The Prefect flows against a real (test harness) Prefect API: parameters checked before any work,
generate resumable from its journal after a failure or a SIGKILL with every row exactly once and
the tokens of an uninterrupted run, eval and bench end to end into the results database with
their artifacts, the nightly regression check, caching on resume, and no retry on bad input."""
import datetime as dt
import base64
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

for key, value in {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(key, value)

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.exceptions import ParameterTypeError  # noqa: E402
from prefect.settings import (PREFECT_API_URL, PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH,  # noqa: E402
                              PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings)
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

import moegen.bench.run  # noqa: E402
from flows.bench import bench_flow  # noqa: E402
from flows.eval import eval_flow, hub_workload, show_eval  # noqa: E402
from flows.generate import generate_flow  # noqa: E402
from moegen.engine import Engine, SamplingParams  # noqa: E402
from moegen.results import connection, queries, recording  # noqa: E402
from moegen.cli import main  # noqa: E402
from moegen.generation.job import GenerationSummary  # noqa: E402
from moegen.generation.journal import recover_rows  # noqa: E402
from moegen.errors import InputError  # noqa: E402
from tasks import data as data_tasks  # noqa: E402
from tasks import generate as generate_tasks  # noqa: E402
from tasks.data import resolve_gsm8k  # noqa: E402
from tasks.evaluation import hub_task_names  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HW = {"cpu": {"model": "Fake CPU", "count": 2}, "gpu": None}
SMALL_ENGINE = {"kv_cache_memory": "64MB"}


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A Prefect API (the test harness's server) with its own home and result storage."""
    home = tmp_path_factory.mktemp("prefect-home")
    settings = {PREFECT_HOME: str(home), PREFECT_LOCAL_STORAGE_PATH: str(home / "storage"),
                PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}       # tasks called alone in a test
    with temporary_settings(settings):
        with prefect_test_harness(server_startup_timeout=120):
            yield {"url": PREFECT_API_URL.value(), "home": str(home)}


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'results' / 'moegen.db'}"


def artifacts_of(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def prompts_file(tmp_path, n: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(n)))
    return path


def generate_params(tiny_fixture, tmp_path, n: int, url: str, **engine) -> dict:
    return {"model": str(tiny_fixture("mixtral")), "dataset": str(prompts_file(tmp_path, n)),
            "out_dir": str(tmp_path / "out"), "dtype": "float32", "sampling": {"max_new_tokens": 6, "ignore_eos": True},
            "engine": {**SMALL_ENGINE, **engine}, "results_url": url}


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def uninterrupted_tokens(params: dict) -> list[list[int]]:
    """Each row's tokens from one uninterrupted engine call over the flow's prompts."""
    engine = Engine.from_pretrained(params["model"], dtype="float32", **SMALL_ENGINE)
    prompts = [row["prompt"] for row in read_rows(params["dataset"])]
    return [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))]


def check_every_row_once(summary: dict, n: int, tokens: list[list[int]]) -> None:
    rows = read_rows(summary["out"])
    assert [r["index"] for r in rows] == list(range(n))
    assert all(r["answer"] == str(2 * r["index"]) for r in rows)
    assert [r["token_ids"] for r in rows] == tokens                    # as if never interrupted


# ---- parameters ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flow, params, message", [
    (eval_flow, {"limit": 0}, "limit: Input should be greater than 0"),
    (eval_flow, {"systems": ["moegen", "vllm"]}, "unknown lm-eval backend(s) vllm"),
    (eval_flow, {"model": "fixture:mixtral"}, "bad fixture spec 'fixture:mixtral'"),
    (bench_flow, {"workloads": ["bogus:n=1"]}, "unknown kind 'bogus'"),
    (bench_flow, {"systems": ["moegen", "moegen"]}, "duplicate entries"),
    (bench_flow, {"engine": {"max_batch": 0}}, "engine.max_batch: Input should be greater than 0"),
    (bench_flow, {"runner": {"kind": "dask"}}, "runner.kind: Input should be 'thread' or 'ray'"),
    (bench_flow, {"regression_threshold": 1.5}, "regression_threshold: Input should be less than 1"),
    (generate_flow, {"sampling": {"top_p": 0}}, "sampling.top_p: Input should be greater than 0"),
])
def test_bad_parameters_are_rejected_before_any_work(prefect_api, flow, params, message):
    with pytest.raises(ParameterTypeError, match="invalid parameters") as info:
        flow(**params)
    assert message in str(info.value)


# ---- generate -----------------------------------------------------------------------------------

def test_cli_flow_and_batch_file_report_the_same_summary(prefect_api, tiny_fixture, tmp_path, url, capsys):
    """One generation job (moegen.generation.job): `moegen generate`, the generate flow and an
    OpenAI batch file, given the same prompts, report the same figures under the same names, and
    the same token counts."""
    params = generate_params(tiny_fixture, tmp_path, n=3, url=url)
    model, dataset = params["model"], params["dataset"]
    flow_summary = generate_flow(**params, record=False, keep_fields=[])
    common = ["--model", model, "--dtype", "float32", "--kv-cache-memory", "64MB", "--max-new-tokens", "6",
              "--ignore-eos", "--quiet"]
    main(["generate", *common, "--input", dataset, "--out", str(tmp_path / "cli.jsonl")])
    cli_summary = json.loads(capsys.readouterr().out)
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                         "body": {"prompt": row["prompt"], "max_tokens": 6, "temperature": 0}}) + "\n"
                             for i, row in enumerate(read_rows(dataset))))
    main(["generate", *common, "--format", "openai-batch", "--input", str(batch), "--out", str(tmp_path / "b.jsonl")])
    batch_summary = json.loads(capsys.readouterr().out)
    fields = {f.name for f in dataclasses.fields(GenerationSummary)} - {"details"}
    for summary in (flow_summary, cli_summary, batch_summary):
        assert fields <= set(summary)
    for name in ("rows", "generated_rows", "prompt_tokens", "generated_tokens"):
        assert flow_summary[name] == cli_summary[name] == batch_summary[name], name
    assert cli_summary["rows"] == 3 and cli_summary["generated_tokens"] == 18


def test_generate_resumes_after_a_failure_mid_run(prefect_api, tiny_fixture, tmp_path, url, kill_journal_after):
    params = generate_params(tiny_fixture, tmp_path, n=10, url=url)
    kill_journal_after(4)
    state = generate_flow(**params, return_state=True)
    assert state.is_failed()
    assert len(read_rows(tmp_path / "out" / generate_tasks.OUTPUT)) == 4    # the finished rows were kept
    kill_journal_after(None)

    state = generate_flow(**params, return_state=True)
    summary = state.result()
    assert summary["resumed_rows"] == 4 and summary["generated_rows"] == 6
    check_every_row_once(summary, 10, uninterrupted_tokens(params))
    assert queries.get_run(summary["run_id"], url)["results"][0]["metrics"]["rows"] == 10
    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert "6 rows generated by this run, 4 kept from an earlier run" in artifacts["generate-report"].data
    assert artifacts["generate-progress"].data == 100.0


def test_generate_refuses_to_mix_in_other_inputs(prefect_api, tiny_fixture, tmp_path, url):
    params = generate_params(tiny_fixture, tmp_path, n=3, url=url)
    generate_flow(**params)
    with pytest.raises(InputError, match="journal of another generation .sampling.max_new_tokens: 6 in the journal"):
        generate_flow(**{**params, "sampling": {"max_new_tokens": 7, "ignore_eos": True}})


def test_generate_killed_mid_run_then_rerun_keeps_every_row_once(prefect_api, tiny_fixture, tmp_path, url):
    n = 16
    params = {**generate_params(tiny_fixture, tmp_path, n=n, url=url, max_batch=2), "flush_rows": 1}
    env = {**os.environ, "PREFECT_API_URL": prefect_api["url"], "PREFECT_HOME": prefect_api["home"]}
    script = "import json, sys; from flows.generate import generate_flow; generate_flow(**json.loads(sys.argv[1]))"
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(params)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out" / generate_tasks.OUTPUT
    deadline = time.monotonic() + 180
    try:
        while not (out.is_file() and out.read_text().count("\n") >= 2):
            assert proc.poll() is None, "the generate subprocess ended before writing a row"
            assert time.monotonic() < deadline, "no row written in 180 s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    on_disk = len(recover_rows(out))
    assert 2 <= on_disk < n, f"{on_disk} rows on disk at the kill"

    summary = generate_flow(**params)
    assert summary["resumed_rows"] == on_disk and summary["generated_rows"] == n - on_disk
    check_every_row_once(summary, n, uninterrupted_tokens(params))


# ---- eval ---------------------------------------------------------------------------------------

def test_gsm8k_falls_back_to_the_hub_only_when_local_data_is_missing_and_online(prefect_api, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    monkeypatch.setattr(data_tasks, "hub_reachable", lambda: True)
    assert resolve_gsm8k(str(tmp_path / "here")) == {"source": str(tmp_path / "here"), "config": None, "local": True}
    # the eval also needs the train split (few-shot examples): a test-only copy is not enough
    assert resolve_gsm8k(str(tmp_path / "here"), splits=("train", "test"))["source"] == "openai/gsm8k"
    assert resolve_gsm8k(str(tmp_path / "missing"))["source"] == "openai/gsm8k"
    monkeypatch.setattr(data_tasks, "hub_reachable", lambda: False)
    with pytest.raises(data_tasks.DatasetError, match="GSM8K not found at .*missing .*hub is unreachable"):
        resolve_gsm8k(str(tmp_path / "missing"))
    assert hub_task_names(["gsm8k_local", "arc_easy"]) == ["gsm8k", "arc_easy"]
    assert hub_workload("gsm8k,n=16,gen=32,split=test") == (
        "hf:openai/gsm8k,subset=main,split=test,template=Question: {question}\\nAnswer:,answer=answer,n=16,gen=32")
    assert hub_workload("synthetic:prompt=8,gen=2,n=2") == "synthetic:prompt=8,gen=2,n=2"


def test_eval_flow_reports_accuracy_beside_throughput(prefect_api, tiny_fixture, url, capsys):
    state = eval_flow(model=str(tiny_fixture("mixtral")), limit=2, num_fewshot=0, dtype="float32",
                      engine=SMALL_ENGINE, bench_workload="gsm8k,n=2,gen=4", probe="off", usd_per_hour=1.0,
                      results_url=url, tags=["test"], return_state=True)
    summary = state.result()
    rows = {r["system"]: r for r in summary["rows"]}
    assert rows["moegen"]["bench_system"] == "moegen" and rows["hf"]["bench_system"] == "hf-generate"
    for r in rows.values():
        assert r["metrics"]["accuracy.gsm8k_local"] is not None and r["metrics"]["e2e_tokens_per_s"] > 0
    assert rows["hf"]["ratios"]["e2e_tokens_per_s"] == 1.0 and rows["moegen"]["ratios"]["e2e_tokens_per_s"] > 0

    run = queries.get_run(summary["run_id"], url)
    assert run["kind"] == "eval" and run["tags"] == ["test"]
    assert run["flow_run_id"] == str(state.state_details.flow_run_id)
    cells = {(c["system"], c["workload"]) for c in run["results"]}
    assert cells == {("moegen", "gsm8k_local"), ("hf", "gsm8k_local"), ("moegen", "gsm8k,n=2,gen=4"),
                     ("hf-generate", "gsm8k,n=2,gen=4")}

    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert {"eval-results", "eval-report"} <= set(artifacts)
    report = artifacts["eval-report"].data
    assert "## Against `hf`" in report and "e2e tok/s **" in report and "throughput.png" in report
    plots = summary["report"]["plots"]
    assert Path(plots["throughput"]).is_file() and Path(plots["CAP radar"]).is_file()
    # the UI is served over http, where file:// images do not load: the plots travel inline
    inline = "![throughput](data:image/png;base64," + base64.b64encode(Path(plots["throughput"]).read_bytes()).decode()
    assert inline in report
    assert Path(plots["throughput"]).parent.parent == connection.reports_dir(url)

    show_eval(summary)
    assert "hf-generate" in capsys.readouterr().out


# ---- bench --------------------------------------------------------------------------------------

def test_bench_flow_measures_the_matrix(prefect_api, tiny_fixture, url):
    workload = "synthetic:prompt=8,gen=3,n=3"
    state = bench_flow(model=str(tiny_fixture("mixtral")), workloads=[workload], dtype="float32",
                       engine=SMALL_ENGINE, probe="off", usd_per_hour=2.0, results_url=url, return_state=True)
    summary = state.result()
    cells = {c["system"]: c for c in summary["cells"]}
    assert set(cells) == {"moegen", "hf-generate"} and summary["kind"] == "bench"
    assert cells["hf-generate"]["ratios"]["e2e_tokens_per_s"] == 1.0
    assert cells["moegen"]["metrics"]["generated_tokens"] == 9
    assert 0 <= cells["moegen"]["metrics"]["token_agreement"] <= 1
    run = queries.get_run(summary["run_id"], url)
    assert {c["workload"] for c in run["results"]} == {workload}
    assert {"bench-results", "bench-report"} <= set(artifacts_of(state.state_details.flow_run_id))


def fake_bench(values: dict, calls: list):
    """A stand-in for moegen.bench.run.run_bench returning e2e tok/s from `values[system]`."""
    def run_bench(model, systems, workload, **kwargs):
        system = systems[0]
        calls.append((system, workload))
        if isinstance(values.get(system), Exception):
            raise values[system]
        e2e = values[system]
        metrics = {"e2e_tokens_per_s": e2e, "prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": e2e}
        return {"schema": 1, "config": {"model": model, "workload": {"spec": workload}}, "hardware": HW,
                "versions": {}, "git": {"commit": "fake"},
                "systems": [{"system": system, "status": "ok", "reason": None, "metrics": metrics, "config": {},
                             "ratios": None, "outputs": [{"token_ids": [5, 6], "text": "x"}]}]}
    return run_bench


def nightly_params(tiny_fixture, url, **extra) -> dict:
    return {"model": str(tiny_fixture("mixtral")), "workloads": ["synthetic:prompt=8,gen=2,n=2"], "nightly": True,
            "repeat": 3, "probe": "off", "results_url": url, **extra}


def test_nightly_regression_fails_the_flow_run(prefect_api, tiny_fixture, url, monkeypatch):
    params = nightly_params(tiny_fixture, url)
    workload = params["workloads"][0]
    for days, e2e in ((2, 100.0), (1, 90.0)):                      # two healthy nightlies: median 95
        when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days)
        previous = [recording.CellResult("moegen", workload, {"e2e_tokens_per_s": e2e}),
                    recording.CellResult("hf-generate", workload, {"e2e_tokens_per_s": 50.0})]
        recording.record_run(params["model"], "nightly", previous, hardware=HW, created_at=when, url=url)

    monkeypatch.setattr(moegen.bench.run, "run_bench", fake_bench({"moegen": 95.0, "hf-generate": 50.0}, []))
    state = bench_flow(**params, return_state=True)
    assert state.is_completed(), state.message                     # at the median of the healthy nightlies

    monkeypatch.setattr(moegen.bench.run, "run_bench", fake_bench({"moegen": 76.0, "hf-generate": 50.0}, []))
    state = bench_flow(**params, return_state=True)
    assert state.is_failed()
    assert "moegen on synthetic:prompt=8,gen=2,n=2 e2e_tokens_per_s -20.0%" in state.message
    markdown = artifacts_of(state.state_details.flow_run_id)["bench-regressions"].data
    assert "| moegen | synthetic:prompt=8,gen=2,n=2 | e2e tok/s | 95 | 76 | -20.0% |" in markdown
    latest = queries.history(last=1, kind="nightly", url=url)[0]
    assert latest["status"] == "regressed" and latest["flow_run_id"] == str(state.state_details.flow_run_id)
    failure = state.result(raise_on_failure=False)                 # an exception carrying the summary, not a dict
    assert str(failure) == state.message and failure.summary["regressions"][0]["current"] == 76.0
    assert "nightly trend" in failure.summary["report"]["plots"]

    # the regressed nightly is not part of the baseline: a healthy run compares with 90, 95, 100
    monkeypatch.setattr(moegen.bench.run, "run_bench", fake_bench({"moegen": 94.0, "hf-generate": 50.0}, []))
    assert bench_flow(**params, return_state=True).is_completed()
    baseline = queries.nightly_baseline(params["model"], "moegen", workload, HW, url=url)
    assert latest["id"] not in baseline["runs"] and sorted(baseline["metrics"]["e2e_tokens_per_s"]) == [
        90.0, 94.0, 95.0, 100.0]


def test_a_nightly_needs_three_passes(prefect_api, tiny_fixture, url):
    state = bench_flow(**nightly_params(tiny_fixture, url, repeat=1), return_state=True)
    assert state.is_failed() and "a nightly needs repeat >= 3" in state.message


def test_a_resumed_run_reuses_finished_cells(prefect_api, tiny_fixture, url, monkeypatch):
    calls = []
    monkeypatch.setattr(moegen.bench.run, "run_bench", fake_bench({"moegen": 10.0, "hf-generate": 5.0}, calls))
    params = nightly_params(tiny_fixture, url, nightly=False)
    first = bench_flow(**params, return_state=True)
    assert len(calls) == 2
    again = bench_flow(**params, resume_from=str(first.state_details.flow_run_id), return_state=True)
    assert again.is_completed() and len(calls) == 2               # both cells came from the cache
    bench_flow(**params)
    assert len(calls) == 4                                        # a new run measures again


def test_bad_input_is_not_retried_but_a_crash_is(prefect_api, tiny_fixture, url, monkeypatch):
    calls = []
    params = nightly_params(tiny_fixture, url, nightly=False, systems=["moegen"], baseline="moegen")
    monkeypatch.setattr(moegen.bench.run, "run_bench", fake_bench({"moegen": InputError("bad workload")}, calls))
    with pytest.raises(InputError, match="bad workload"):
        bench_flow(**params)
    assert len(calls) == 1
    monkeypatch.setattr("tasks.systems.run_bench_cell.retry_delay_seconds", 0)
    monkeypatch.setattr(moegen.bench.run, "run_bench", fake_bench({"moegen": RuntimeError("CUDA hiccup")}, calls))
    with pytest.raises(RuntimeError, match="CUDA hiccup"):
        bench_flow(**params)
    assert len(calls) == 3                                        # one retry
