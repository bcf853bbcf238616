"""Issue 23, case 6: a flow run killed mid-run on the served stack goes Crashed, the automation of
deployments/automations.yaml schedules it again, the worker runs it again, and it resumes from its
journal: every row once, in input order, and the run recorded once. Killed together with its
worker, the run sends no more heartbeats: the second automation marks it Crashed, and once a worker
is back it resumes the same way. A run that keeps crashing stops being resumed
(flows.common.check_resume_limit)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.served_stack import PREFECT, REPO, free_port, run, stack_env

ROWS = 24


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """serve.sh's stack, shared by this module's tests; stop.sh takes it down."""
    tmp_path = tmp_path_factory.mktemp("crash-stack")
    port = free_port()
    env = stack_env(tmp_path, port, PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30")   # Prefect's least; 180 by default
    try:
        out = run([str(REPO / "deployments" / "serve.sh")], env, timeout=400)
        yield {"env": {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, "out": out, "serve_env": env,
               "dir": tmp_path / "stack"}
    finally:
        subprocess.run([str(REPO / "deployments" / "stop.sh")], env=env, cwd=REPO, capture_output=True, timeout=60)


def flow_run_states(api: str, flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    with temporary_settings({PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id), client.read_flow_run_states(flow_run_id)


def wait_for(api: str, flow_run_id: str, done, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        flow_run, states = flow_run_states(api, flow_run_id)
        if done(flow_run):
            return flow_run, [s.type.value for s in states]
        assert time.monotonic() < deadline, f"{what}: not in {timeout} s: {[s.type.value for s in states]}"
        time.sleep(2)


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["the flow run's process", "its worker too"])
def test_a_killed_generate_run_is_resumed_from_its_journal(stack, tiny_fixture, tmp_path, killed):
    from moegen.results import queries
    assert "automation: moegen-resume-crashed" in stack["out"]
    if killed == "its worker too":              # heartbeats every 30 s: a run silent for 75 s is lost
        quick = tmp_path / "automations.yaml"
        quick.write_text((REPO / "deployments" / "automations.yaml").read_text().replace("within: 600", "within: 75"))
        run([sys.executable, str(REPO / "deployments" / "automations.py"), str(quick)], stack["env"], timeout=120)
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} times {i}?"}) + "\n" for i in range(ROWS)))
    out_dir, url = tmp_path / "gen", f"sqlite:///{tmp_path / 'results.db'}"
    params = {"model": str(tiny_fixture("mixtral")), "dataset": str(src), "limit": ROWS, "out_dir": str(out_dir),
              "sampling": {"max_new_tokens": 24, "ignore_eos": True}, "dtype": "float32", "flush_rows": 1,
              "engine": {"max_batch": 2, "kv_cache_memory": "64MB"}, "results_url": url, "tags": ["crash-test"]}
    argv = [arg for key, value in params.items() for arg in ("-p", f"{key}={json.dumps(value)}")]
    started = run([PREFECT, "deployment", "run", "generate/gsm8k", *argv], stack["env"], timeout=120)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)

    journal, lock = out_dir / "completions.jsonl", out_dir / "completions.jsonl.journal.lock"
    deadline = time.monotonic() + 400
    while not (journal.exists() and journal.read_text().count("\n") >= 3 and lock.exists()):
        assert time.monotonic() < deadline, "the flow run wrote no rows in 400 s"
        time.sleep(0.2)
    writer = int(lock.read_text().split()[0])          # the flow run's own process: it holds the journal
    api = stack["env"]["PREFECT_API_URL"]
    if killed == "its worker too":
        worker = int((stack["dir"] / "worker.pid").read_text())
        os.killpg(worker, signal.SIGKILL)                 # serve.sh started it in a session of its own
        os.kill(writer, signal.SIGKILL) if Path(f"/proc/{writer}").exists() else None
        # no worker: the run is marked Crashed for its silence, then Scheduled, and waits
        wait_for(api, flow_run_id, lambda r: r.state.is_scheduled() and "Resuming" == r.state.name, "rescheduled", 300)
        run([str(REPO / "deployments" / "serve.sh")], stack["serve_env"], timeout=400)    # a worker is back
    else:
        os.kill(writer, signal.SIGKILL)
    flow_run, types = wait_for(api, flow_run_id, lambda r: r.state.is_final() and not r.state.is_crashed(),
                               "resumed", 600)
    assert flow_run.state.is_completed(), (flow_run.state, types)
    assert "CRASHED" in types and types.index("CRASHED") < len(types) - 1       # crashed, then ran again
    indices = [json.loads(line)["index"] for line in journal.read_text().splitlines()]
    assert indices == list(range(ROWS))                                       # every row once, input order
    recorded = queries.history(flow_run_id=flow_run_id, url=url)
    assert len(recorded) == 1 and recorded[0]["kind"] == "generate"


def test_a_run_that_keeps_crashing_is_not_resumed_forever(monkeypatch):
    from prefect.client.schemas.objects import StateType

    from flows import common
    from moegen.errors import MachineFault

    class State:
        def __init__(self, kind):
            self.type = kind

    class Client:
        def __init__(self, crashes):
            self.crashes = crashes

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def read_flow_run_states(self, run_id):
            return [State(StateType.RUNNING), *[State(StateType.CRASHED)] * self.crashes]

    monkeypatch.setattr(common.flow_run, "get_id", lambda: "run-1")
    monkeypatch.setattr(common.flow_run, "get_name", lambda: "bold-fox")
    monkeypatch.setattr(common.flow_run, "get_run_count", lambda: 5)
    import prefect.client.orchestration as orchestration
    monkeypatch.setattr(orchestration, "get_client", lambda sync_client: Client(common.RESUME_LIMIT))
    common.check_resume_limit()                                   # at the limit: resumes once more
    monkeypatch.setattr(orchestration, "get_client", lambda sync_client: Client(common.RESUME_LIMIT + 1))
    with pytest.raises(MachineFault, match="crashed 4 times; not resuming it again"):
        common.check_resume_limit()


@pytest.mark.slow
def test_a_crashed_run_the_automation_missed_is_resumed_by_the_resumer(stack):
    """The server can lose a Crashed event (SQLite "database is locked" in its trigger processing,
    the message dead-lettered): the automation then never acts. deployments/resume_crashed.py, which
    serve.sh starts, schedules such a run again once it has been Crashed past the grace; runs not
    tagged resume-on-crash, or crashed just now, are left alone. Here the automation is paused, as
    if it had missed them."""
    import asyncio
    import importlib.util

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed
    assert "resumer: started" in stack["out"] and (stack["dir"] / "resumer.pid").exists()
    spec = importlib.util.spec_from_file_location("resume_crashed", REPO / "deployments" / "resume_crashed.py")
    resumer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(resumer)

    @flow(name="crash-test-orphan")
    def orphan():
        pass

    async def scenario():
        async with get_client() as client:
            automation = (await client.read_automations_by_name("moegen-resume-crashed"))[0]
            await client.pause_automation(automation.id)
            try:
                tagged = await client.create_flow_run(orphan, tags=[resumer.TAG], state=Crashed())
                plain = await client.create_flow_run(orphan, tags=["other"], state=Crashed())
                early = await resumer.sweep(client, grace_s=3600)             # crashed just now: its turn later
                resumed = await resumer.sweep(client, grace_s=0)
                states = [(await client.read_flow_run(r.id)).state for r in (tagged, plain)]
                return early, resumed, tagged.id, states
            finally:
                await client.resume_automation(automation.id)

    with temporary_settings({PREFECT_API_URL: stack["env"]["PREFECT_API_URL"]}):
        early, resumed, tagged_id, (tagged_state, plain_state) = asyncio.run(scenario())
    assert tagged_id not in early and tagged_id in resumed
    assert tagged_state.is_scheduled() and tagged_state.name == "Resuming"
    assert plain_state.is_crashed()
