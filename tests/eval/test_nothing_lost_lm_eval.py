"""Issue 23, cases 4, 10 and 11: `moegen lm-eval --use_cache` never serves another model's answers
(the cache is namespaced by checkpoint fingerprint and model_args), lm-eval's errors through our
launcher are one line, and `moegen eval` checks --limit / --num-fewshot before any work."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets / huggingface_hub are imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from moegen.cli import main  # noqa: E402
from moegen.eval.launcher import cache_key  # noqa: E402
from moegen.engine import Engine  # noqa: E402
from moegen.checkpoints.fingerprints import checkpoint_fingerprint  # noqa: E402
from moegen.checkpoints.fixture import build_fixture  # noqa: E402

KV = "256MB"


pytestmark = pytest.mark.usefixtures("lm_eval_offline")


@pytest.fixture(scope="module")
def other_seed(tmp_path_factory):
    """The same architecture and config as tiny_fixture's, other weights: what a path or a
    config.json cannot tell apart."""
    return build_fixture("mixtral", "tiny", seed=7, out=tmp_path_factory.mktemp("seed7") / "ckpt")


def test_fingerprint_tells_checkpoints_of_one_config_apart(tiny_fixture, other_seed, tmp_path):
    a = tiny_fixture("mixtral")
    assert (a / "config.json").read_bytes() == (other_seed / "config.json").read_bytes()
    assert checkpoint_fingerprint(a) != checkpoint_fingerprint(other_seed)
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(a)
    args = f"pretrained={a},dtype=float32"
    assert cache_key("moegen", args) != cache_key("moegen", f"pretrained={other_seed},dtype=float32")
    assert cache_key("moegen", args) != cache_key("moegen", f"pretrained={a},dtype=bfloat16")
    assert cache_key("moegen", args) != cache_key("hf", args)
    assert cache_key("moegen", args) == cache_key("moegen", {"dtype": "float32", "pretrained": str(a)})


def test_use_cache_never_answers_for_another_model(tiny_fixture, other_seed, tmp_path, monkeypatch):
    calls = []
    real = Engine.generate_iter
    monkeypatch.setattr(Engine, "generate_iter", lambda self, prompts, *a, **k: calls.append(len(prompts))
                        or real(self, prompts, *a, **k))
    cache = tmp_path / "cache" / "lm"

    def run(model):
        return main(["lm-eval", "--model", "moegen", "--model_args", f"pretrained={model},dtype=float32,kv_cache_memory={KV}",
                     "--tasks", "gsm8k_local", "--limit", "2", "--num_fewshot", "0", "--gen_kwargs", "max_gen_toks=3",
                     "--use_cache", str(cache)])

    assert run(tiny_fixture("mixtral")) == 0 and calls == [2]
    assert run(other_seed) == 0 and calls == [2, 2]              # the other model's answers were not served
    assert run(tiny_fixture("mixtral")) == 0 and calls == [2, 2]  # ... and each resumes from its own
    assert len(list(cache.parent.glob("lm-*_rank0.db"))) == 2


def test_an_unknown_task_is_one_line(tiny_fixture, capsys):
    status = main(["lm-eval", "--model", "moegen", "--model_args", f"pretrained={tiny_fixture('mixtral')}",
                   "--tasks", "no_such_task", "--limit", "2"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "moegen lm-eval: error: lm-eval: Tasks not found: no_such_task" in err


@pytest.mark.parametrize("extra, message", [
    (["--limit", "0"], "--limit must be at least 1"),
    (["--limit", "-1"], "--limit must be at least 1"),
    (["--num-fewshot", "-1"], "--num-fewshot must be 0 or more"),
    (["--num-fewshot", "8000"], "--num-fewshot 8000: task gsm8k_local has only 7473 examples to draw few-shot from"),
])
def test_eval_limits_are_checked_before_any_work(tiny_fixture, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(Engine, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    status = main(["eval", "--model", str(tiny_fixture("mixtral")), "--tasks", "gsm8k_local", *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err


def test_the_moegen_model_refuses_a_cache_of_another_model(tiny_fixture, other_seed, tmp_path):
    """The same from Python (simple_evaluate(use_cache=...)), where no launcher picks the file."""
    from lm_eval.api.model import CachingLM

    from moegen.errors import ConfigError
    from moegen.eval.lm_eval_backend import MoegenLM

    def lm(model, dtype="float32"):
        return MoegenLM(engine=Engine.from_pretrained(model, dtype=dtype, kv_cache_memory=KV), pretrained=str(model))

    cache = str(tmp_path / "cache.db")
    CachingLM(lm(tiny_fixture("mixtral")), cache)
    CachingLM(lm(tiny_fixture("mixtral")), cache)                       # the same model: its own cache
    with pytest.raises(ConfigError, match="holds the answers of another model .*checkpoint_sha256"):
        CachingLM(lm(other_seed), cache)
    with pytest.raises(ConfigError, match="dtype: float32 there, bfloat16 here"):
        CachingLM(lm(tiny_fixture("mixtral"), "bfloat16"), cache)
    from sqlitedict import SqliteDict
    with SqliteDict(str(tmp_path / "unmarked.db"), autocommit=True) as db:
        db["0" * 64] = "an answer from somewhere"
    with pytest.raises(ConfigError, match="no moegen model vouches for"):
        CachingLM(lm(other_seed), str(tmp_path / "unmarked.db"))
