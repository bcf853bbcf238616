"""`python -m flows.*` in-process runs: SIGTERM ends the flow through a normal exit, so Prefect's
temporary API server (a child process) is stopped instead of left running."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
SLEEPY_FLOW = """
import time
from prefect import flow
from flows.cli import run_flow_from_argv

@flow(name="sleepy")
def sleepy() -> dict:
    time.sleep(120)
    return {}

run_flow_from_argv(sleepy, argv=[])
"""


def temporary_server(proc: psutil.Process) -> psutil.Process | None:
    for child in proc.children(recursive=True):
        try:
            if "uvicorn" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.slow
def test_sigterm_stops_the_temporary_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PYTHONPATH=str(REPO))
    flow = subprocess.Popen([sys.executable, "-c", SLEEPY_FLOW], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent, server = psutil.Process(flow.pid), None
    try:
        for _ in range(120):
            server = temporary_server(parent)
            if server is not None:
                break
            time.sleep(1)
        assert server is not None, "the flow never started a temporary server"
        time.sleep(8)                                # the flow run is under way (it sleeps for 120 s)
        flow.send_signal(signal.SIGTERM)
        out, _ = flow.communicate(timeout=60)
        assert flow.returncode == 128 + signal.SIGTERM, out[-2000:]
        gone, _ = psutil.wait_procs([server], timeout=20)
        assert gone, f"temporary server {server.pid} still running after the flow ended"
    finally:                                         # never leave a process behind, whatever failed
        for p in [server, parent]:
            if p is not None and p.is_running():
                p.kill()
