"""Data-parallel replicas on Ray (CPU): two replicas give the rows one engine gives, and killing
one replica's process mid-run still ends with every row exactly once (the others redo its rows)."""
import json
import os
import signal

import pytest

ray = pytest.importorskip("ray")

from moegen.cli import main  # noqa: E402
from moegen.engine import SamplingParams  # noqa: E402
from moegen.generation.replicas import Replicas  # noqa: E402
from moegen.recipe import EngineRecipe  # noqa: E402

pytestmark = pytest.mark.slow          # a Ray start and two engine processes
N = 10
NEW_TOKENS = 24        # with one sequence at a time, enough steps that a replica is still busy when killed
ENGINE = {"dtype": "float32", "kv_cache_memory": "16MB", "max_batch": 1}
PARAMS = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module (its start takes 10-20 s); Replicas use it as they find it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prompts():
    return [f"Question {i}: what is {i} plus {i}?" + " Think." * (i % 3) for i in range(N)]


@pytest.fixture(scope="module")
def one_engine_rows(tiny_fixture, prompts):
    engine = EngineRecipe(str(tiny_fixture("mixtral")), kwargs=ENGINE).build()
    return [c.to_row() for c in engine.generate(prompts, PARAMS)]


def test_two_replicas_give_the_rows_of_one_engine(tiny_fixture, prompts, one_engine_rows, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    code = main(["generate", "--model", str(tiny_fixture("mixtral")), "--input", str(src), "--out", str(out),
                 "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos", "--dtype", "float32",
                 "--kv-cache-memory", "16MB", "--max-batch", "1", "--quiet", "--replicas", "2"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["replicas"] == 2
    assert [json.loads(line) for line in out.read_text().splitlines()] == one_engine_rows


def test_killing_a_replica_mid_run_still_gives_every_row_once(tiny_fixture, prompts, one_engine_rows):
    recipe = EngineRecipe(str(tiny_fixture("mixtral")), kwargs=ENGINE)
    with Replicas(recipe, 2, window=1) as replicas:      # each holds few prompts: the rest wait in the queue
        victim = replicas.pids[0]
        rows = []
        for completion in replicas.generate_iter(prompts, PARAMS):
            rows.append(completion.to_row())
            if len(rows) == 1:
                os.kill(victim, signal.SIGKILL)
        # (whether the driver saw the death depends on timing: on a loaded machine the victim can have
        # finished its last row before the kill; what must hold either way is below)
        assert replicas.pids != []                                      # a replica lived to finish
    assert sorted(r["index"] for r in rows) == list(range(N))          # every row exactly once
    assert sorted(rows, key=lambda r: r["index"]) == one_engine_rows
