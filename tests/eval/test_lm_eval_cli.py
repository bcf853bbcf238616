"""`moegen lm-eval` / `python -m moegen.lm_eval`: lm-eval's own CLI with the moegen model and the
offline tasks, --apply_chat_template through the checkpoint's template, --use_cache resuming."""
import argparse
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets / huggingface_hub are imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from moegen.cli import main  # noqa: E402
from moegen.eval.launcher import amend  # noqa: E402
from moegen.engine import Engine  # noqa: E402
from moegen.eval.tasks import TASKS_DIR  # noqa: E402
from tests.chat_templates import MISTRAL  # noqa: E402

KV = "256MB"
HISTORY = [{"role": "user", "content": "Question: 2+2?\nAnswer:"}, {"role": "assistant", "content": " 4"},
           {"role": "user", "content": "Question: 3+3?\nAnswer:"}]


@pytest.fixture(scope="module")
def ckpt(mistral_chat_fixture):
    return mistral_chat_fixture


pytestmark = pytest.mark.usefixtures("lm_eval_offline")


def test_chat_context_ids_equal_transformers(ckpt):
    """What lm-eval feeds: the rendered history, then tok_encode of it (no second BOS, "</s>" a token)."""
    from moegen.eval.lm_eval_backend import MoegenLM
    lm = MoegenLM(engine=Engine.from_pretrained(ckpt, dtype="float32", kv_cache_memory=KV), pretrained=str(ckpt))
    hf = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    context = lm.apply_chat_template(HISTORY)
    assert context == hf.apply_chat_template(HISTORY, add_generation_prompt=True, tokenize=False)
    assert lm.tok_encode(context) == hf.apply_chat_template(HISTORY, add_generation_prompt=True, return_dict=False)
    assert lm.chat_template(True) == MISTRAL and lm.tokenizer_name == str(ckpt).replace("/", "__")


def test_cache_keeps_what_an_interrupted_generation_finished(ckpt, tmp_path, monkeypatch):
    """Generations reach lm-eval's cache as each finishes: a rerun after a crash asks only for the rest."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import CachingLM

    from moegen.eval.lm_eval_backend import MoegenLM
    lm = MoegenLM(engine=Engine.from_pretrained(ckpt, dtype="float32", kv_cache_memory=KV), pretrained=str(ckpt))
    gen = {"until": ["\n\n"], "max_gen_toks": 3}
    requests = [Instance("generate_until", {}, (f"Question: {q}\nAnswer:", gen), i) for i, q in enumerate(["1+1?", "2+2?"])]
    real = Engine.generate_iter

    def crash_after_one(self, *a, **k):
        yield next(real(self, *a, **k))
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "generate_iter", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        CachingLM(lm, str(tmp_path / "cache.db")).generate_until(requests)
    asked = []
    monkeypatch.setattr(Engine, "generate_iter", lambda self, prompts, *a, **k: asked.append(len(prompts))
                        or real(self, prompts, *a, **k))
    texts = CachingLM(lm, str(tmp_path / "cache.db")).generate_until(requests)
    assert asked == [1] and len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_task_path_and_device_defaults(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace(include_path="/x", device=None, model_args={"pretrained": "d"})
    amend(args)
    assert args.include_path == [str(TASKS_DIR), "/x"] and args.device == "cpu"
    args = argparse.Namespace(include_path=None, device=None, model_args={"device": "cuda:1"})
    amend(args)
    assert args.include_path == [str(TASKS_DIR)] and args.device == "cuda:1" and args.model_args == {}
    args = argparse.Namespace(device="cuda:0", model_args=None)
    amend(args)
    assert args.device == "cuda:0"                      # given: left alone


def test_python_m_launcher_is_lm_evals_cli():
    out = subprocess.run([sys.executable, "-m", "moegen.lm_eval", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "lm-eval" in out.stdout and "run" in out.stdout


@pytest.mark.slow
def test_gsm8k_chat_run_then_cache_only(ckpt, tmp_path, monkeypatch):
    calls = []
    for name in ("generate_iter", "loglikelihood"):
        real = getattr(Engine, name)
        monkeypatch.setattr(Engine, name, lambda self, *a, _real=real, _name=name, **k: calls.append(_name)
                            or _real(self, *a, **k))
    out, cache = tmp_path / "results", tmp_path / "cache" / "lm"
    argv = ["lm-eval", "--model", "moegen", "--model_args", f"pretrained={ckpt},dtype=float32,kv_cache_memory={KV}",
            "--tasks", "gsm8k_local", "--limit", "2", "--gen_kwargs", "max_gen_toks=4", "--batch_size", "auto",
            "--apply_chat_template", "--fewshot_as_multiturn", "--log_samples", "--output_path", str(out),
            "--use_cache", str(cache)]
    assert main(argv) == 0
    assert calls == ["generate_iter"]
    first = samples(out)
    assert len(first) == 2 * 2                          # 2 documents x 2 filters
    assert all(s["arguments"]["gen_args_0"]["arg_0"].startswith("<s>[INST] Question:") for s in first)
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["chat_template"] == MISTRAL and results["fewshot_as_multiturn"] is True
    assert "gsm8k_local" in results["results"]

    calls.clear()
    shutil.rmtree(out)
    assert main(argv) == 0
    assert calls == []                                  # every response came from the cache
    assert [s["resps"] for s in samples(out)] == [s["resps"] for s in first]


def samples(out):
    (path,) = out.rglob("samples_gsm8k_local_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: (s["doc_id"], s["filter"]))
