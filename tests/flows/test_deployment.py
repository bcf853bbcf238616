"""deployments/serve.sh on a free loopback port brings up a real Prefect server, the work pool,
the deployments of deployments/prefect.yaml and a worker; `prefect deployment run eval/mixtral`
then really executes, and its rows land in the results database and its artifacts in Prefect;
the server's scheduler creates bench/nightly's cron runs ahead of time, without errors."""
import re
import subprocess
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterState, FlowRunFilterStateType)
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from moegen.results import queries
from tests.served_stack import PREFECT, REPO, free_port, run, stack_env


def eval_params(model: Path, url: str) -> list[str]:
    params = {"model": str(model), "limit": "2", "num_fewshot": "0", "dtype": "float32", "systems": '["moegen"]',
              "baseline": "moegen", "bench_systems": '["moegen"]', "bench_workload": "gsm8k,n=2,gen=4",
              "probe": "off", "engine": '{"kv_cache_memory": "64MB"}', "results_url": url, "tags": '["deployment-test"]'}
    return [arg for key, value in params.items() for arg in ("-p", f"{key}={value}")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The stack serve.sh brings up, shared by this module's tests; stop.sh takes it down."""
    tmp_path = tmp_path_factory.mktemp("stack")
    port = free_port()
    # the scheduler looks for due deployments every 60 s by default; sooner here
    env = stack_env(tmp_path, port, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
    try:
        out = run([str(REPO / "deployments" / "serve.sh")], env, timeout=400)
        yield {"env": env, "out": out, "dir": tmp_path, "api": f"http://127.0.0.1:{port}/api"}
    finally:
        subprocess.run([str(REPO / "deployments" / "stop.sh")], env=env, cwd=REPO, capture_output=True, timeout=60)
    # stop.sh ended every process it recorded (an error at teardown otherwise)
    assert not any((tmp_path / "stack" / f"{name}.pid").exists() for name in ("resumer", "worker", "server"))


def scheduled_runs(api: str, deployment: str) -> list:
    with temporary_settings({PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.SCHEDULED]))))


@pytest.mark.slow
def test_scheduler_creates_nightly_runs(stack):
    """The cron schedule of bench/nightly produces Scheduled flow runs (prefect 3.8's scheduler
    fails on every loop with SQLAlchemy 2.1, and no run is ever created)."""
    runs = []
    for _ in range(60):
        runs = scheduled_runs(stack["api"], "nightly")
        if runs:
            break
        time.sleep(2)
    log = (stack["dir"] / "stack" / "server.log").read_text()
    assert "bulk DML" not in log and "schedule_deployments" not in log, log[-3000:]
    assert runs, f"no scheduled bench/nightly run after 120 s; server log:\n{log[-3000:]}"
    assert all(r.state.type == StateType.SCHEDULED and r.expected_start_time.hour == 2 for r in runs)
    env_sh = (stack["dir"] / "stack" / "env.sh").read_text()
    assert "MOEGEN_RESULTS_URL=" in env_sh and "PREFECT_API_URL=" in env_sh


@pytest.mark.slow
def test_serve_then_deployment_run_eval_mixtral(stack, tiny_fixture, tmp_path):
    url = f"sqlite:///{tmp_path / 'results' / 'moegen.db'}"
    env, out = stack["env"], stack["out"]
    assert "eval/mixtral" in out and "bench/nightly" in out and "generate/gsm8k" in out
    cli_env = {**env, "PREFECT_API_URL": stack["api"]}
    out = run([PREFECT, "deployment", "run", "eval/mixtral", *eval_params(tiny_fixture("mixtral"), url),
               "--watch", "--watch-timeout", "600"], cli_env, timeout=700)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    with temporary_settings({PREFECT_API_URL: cli_env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run_id)
            artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert flow_run.state.is_completed(), flow_run.state
    assert {"eval-results", "eval-report"} <= {a.key for a in artifacts}
    runs = queries.history(flow_run_id=flow_run_id, url=url)
    assert len(runs) == 1 and runs[0]["kind"] == "eval" and runs[0]["tags"] == ["deployment-test"]
    assert {(c["system"], c["workload"]) for c in runs[0]["results"]} == {("moegen", "gsm8k_local"),
                                                                          ("moegen", "gsm8k,n=2,gen=4")}

