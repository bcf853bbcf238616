"""The bench matrix through prefect-ray's RayTaskRunner on a local Ray instance (extra `cluster`)."""
import os

import pytest

pytest.importorskip("prefect_ray", reason="prefect-ray is not installed (extra `cluster`)")

for key, value in {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                   "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(key, value)

from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.bench import bench_flow, ray_resources  # noqa: E402
from flows.params import TaskRunnerChoice  # noqa: E402
from moegen.results import queries  # noqa: E402


def test_cells_reserve_a_gpu_each_on_cuda_and_the_whole_machine_on_a_local_cpu():
    assert ray_resources(TaskRunnerChoice(kind="ray"), "cuda") == {"num_gpus": 1, "num_cpus": os.cpu_count()}
    assert ray_resources(TaskRunnerChoice(kind="ray", gpus_per_cell=2, ray_address="ray://head:10001"), "cuda") == \
        {"num_gpus": 2, "num_cpus": 1}
    assert ray_resources(TaskRunnerChoice(kind="ray"), "cpu")["num_gpus"] == 0


@pytest.mark.slow
def test_bench_matrix_runs_on_a_local_ray(tiny_fixture, tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'moegen.db'}"
    home = tmp_path / "prefect-home"
    workloads = ["synthetic:prompt=8,gen=2,n=2", "synthetic:prompt=4,gen=3,n=2"]
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_LOCAL_STORAGE_PATH: str(home / "storage")}):
        with prefect_test_harness(server_startup_timeout=120):
            summary = bench_flow(model=str(tiny_fixture("mixtral")), workloads=workloads, dtype="float32",
                                 engine={"kv_cache_memory": "64MB"}, probe="off", runner={"kind": "ray"}, results_url=url)
    cells = {(c["system"], c["workload"]): c for c in summary["cells"]}
    assert set(cells) == {(s, w) for s in ("moegen", "hf-generate") for w in workloads}
    assert all(c["skipped_reason"] is None and c["metrics"]["e2e_tokens_per_s"] > 0 for c in cells.values())
    assert len(queries.get_run(summary["run_id"], url)["results"]) == 4
    assert "Using Ray cluster with 1 nodes" in caplog.text
