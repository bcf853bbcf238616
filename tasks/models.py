"""Models: the project's random-weight fixtures (built on first use) or a real checkpoint directory."""
from __future__ import annotations

import re
from pathlib import Path

from prefect import get_run_logger, task

from moegen.errors import CheckpointError, ConfigError
from tasks.common import retry_unless_bad_input

FIXTURE_SPEC = re.compile(r"^fixture:(?P<arch>[a-z0-9_]+)/(?P<preset>[a-z0-9]+)(?:@(?P<seed>\d+))?$")
DEFAULT_FIXTURES_DIR = "runs/fixtures"


def parse_fixture_spec(model: str) -> dict | None:
    """{"arch", "preset", "seed"} for `fixture:<arch>/<preset>[@seed]`, None for anything else."""
    match = FIXTURE_SPEC.match(model)
    if match is None:
        if model.startswith("fixture:"):
            raise ConfigError(f"bad fixture spec {model!r}: use fixture:<arch>/<preset>[@seed], "
                              "e.g. fixture:mixtral/bench")
        return None
    return {"arch": match["arch"], "preset": match["preset"], "seed": int(match["seed"] or 0)}


def fixture_dir(spec: dict, fixtures_dir: str | Path) -> Path:
    """runs/fixtures/<arch>-<preset> for seed 0 (what `make run` builds), ...-s<seed> otherwise."""
    name = f"{spec['arch']}-{spec['preset']}" + (f"-s{spec['seed']}" if spec["seed"] else "")
    return Path(fixtures_dir) / name


def resolve_model(model: str, fixtures_dir: str | Path = DEFAULT_FIXTURES_DIR) -> Path:
    """The checkpoint directory for a model parameter, building a fixture if one is named."""
    from moegen.checkpoints.fixture import build_fixture

    spec = parse_fixture_spec(model)
    if spec is not None:
        return build_fixture(spec["arch"], spec["preset"], spec["seed"], fixture_dir(spec, fixtures_dir)).resolve()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"model {model!r} is neither a fixture spec (fixture:<arch>/<preset>) "
                              "nor a checkpoint directory with config.json")
    return path.resolve()


@task(retries=1, retry_condition_fn=retry_unless_bad_input, task_run_name="prepare-model")
def prepare_model(model: str, fixtures_dir: str = DEFAULT_FIXTURES_DIR) -> str:
    """Checkpoint path of `model`: a real checkpoint directory, or `fixture:<arch>/<preset>[@seed]`
    built under fixtures_dir the first time (a built fixture is reused)."""
    path = resolve_model(model, fixtures_dir)
    get_run_logger().info("model %s -> %s", model, path)
    return str(path)
