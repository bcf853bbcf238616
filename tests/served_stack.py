"""Helpers for the tests that bring up deployments/serve.sh's Prefect stack (test_deployment.py,
test_nothing_lost_crash.py): a free port, a checked subprocess run, the stack's environment."""
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")        # the CLI of the environment running the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env, timeout):
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def stack_env(tmp_path, port: int, **extra: str) -> dict:
    """This process's environment less its PREFECT_* settings, plus a stack of its own under
    tmp_path on `port`; `extra` settings on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_PORT": str(port), "MOEGEN_PREFECT_DIR": str(tmp_path / "stack"),
            "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "VENV": str(Path(PREFECT).parents[1]),
            **extra}
