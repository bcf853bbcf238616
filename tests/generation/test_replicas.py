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


def answers(out) -> list:
    """A batch output's rows without their random ids and creation time."""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return [(r["index"], r["custom_id"], r["response"]["status_code"], r["error"],
             r["response"]["body"].get("choices"), r["response"]["body"].get("usage")) for r in rows]


def test_a_batch_file_through_two_replicas_gives_the_rows_of_one_engine(tiny_fixture, prompts, tmp_path, capsys):
    """--format openai-batch runs the one generation job, replicas included: --replicas 2 answers
    a batch file (greedy and seeded rows, a refused line) as one engine does."""
    src = tmp_path / "batch.jsonl"
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0 if i % 2 else 1.0,
                                  "seed": i}}) for i, p in enumerate(prompts)]
    lines.insert(3, "{not json")
    src.write_text("\n".join(lines) + "\n")
    outs = {}
    for replicas in (1, 2):
        outs[replicas] = tmp_path / f"out{replicas}.jsonl"
        code = main(["generate", "--model", str(tiny_fixture("mixtral")), "--format", "openai-batch", "--input",
                     str(src), "--out", str(outs[replicas]), "--max-new-tokens", "4", "--dtype", "float32",
                     "--kv-cache-memory", "16MB", "--max-batch", "1", "--quiet", "--replicas", str(replicas)])
        assert code == 0, capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out)
        assert summary["rows"] == N + 1 and summary["failed"] == 1 and summary.get("replicas", 1) == replicas
    assert answers(outs[2]) == answers(outs[1])
    assert [a[2] for a in answers(outs[1])].count(200) == N


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
