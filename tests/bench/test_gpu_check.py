"""The GPU check script, rehearsed on the CPU: every step runs (weights streamed by the staged
backend), prints its PASS lines and writes its JSON. So the day a GPU machine is lent, the script
that runs there has already run here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKS = (["native-ops"] + [f"exact-{a}" for a in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
                                                   "deepseek_v3")]
          + ["quantized-fp8", "quantized-int4", "prefix-caching", "logprobs", "device-attention-mixtral",
             "device-attention-deepseek_v2", "n-samples", "footprint-bf16",
             "footprint-fp8", "throughput-mixtral", "throughput-v2lite", "disk-to-device"])


@pytest.mark.slow     # about 2 minutes here: it writes and runs ten checkpoints, one of 1.3 GB
def test_gpu_check_rehearsal_passes_every_check(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "MOEGEN_CHECK_WORK": str(tmp_path / "work")}
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--rehearse", str(tmp_path / "out")], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=900)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout + run.stderr
    assert [line.split(":")[0] for line in lines if line.startswith(("PASS", "FAIL"))] == [f"PASS {c}" for c in CHECKS]
    recorded = [c for f in sorted((tmp_path / "out").glob("*.json")) for c in json.loads(f.read_text())["checks"]]
    assert sorted(c["name"] for c in recorded) == sorted(CHECKS) and all(c["ok"] for c in recorded)
    assert "0 step(s) failed" in lines[-1]


def test_gpu_check_says_which_python_lacks_torch(tmp_path):
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--rehearse", str(tmp_path)], cwd=REPO,
                         env={**os.environ, "PYTHON": "/bin/false"}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stdout.startswith("FAIL setup: /bin/false cannot import torch")
