"""The lm-eval backend (moegen.eval.lm_eval_backend), run_eval / `moegen eval`, and the offline GSM8K tasks.

moegen and lm-eval's own `hf` backend run the same tiny float32 checkpoint greedily and must give
identical per-sample responses and scores.
"""
import argparse
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets / huggingface_hub are imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from lm_eval.utils import hash_string  # noqa: E402

from moegen.errors import ConfigError, InputError  # noqa: E402
from moegen.eval.run import run_eval  # noqa: E402
from moegen.eval.tasks import gsm8k_data  # noqa: E402
from tests.hf_reference import hf_logits, hf_model  # noqa: E402

LIMIT = 20
KV = "256MB"  # the engine's KV cache (default: a quarter of RAM, too much for a shared test box)


@pytest.fixture(scope="module")
def ckpt(tiny_fixture):
    return tiny_fixture("mixtral")


pytestmark = pytest.mark.usefixtures("lm_eval_offline")


@pytest.fixture(scope="module")
def engine(ckpt):
    from moegen.engine import Engine
    return Engine.from_pretrained(ckpt, dtype="float32", kv_cache_memory=KV)


def both(ckpt, task, hf_batch):
    """hf_batch: hf's batch size; generation gets faster with it, loglikelihood bigger."""
    options = {"moegen": {"kv_cache_memory": KV}, "hf": {"batch_size": hf_batch}}
    return {s: run_eval(ckpt, [task], limit=LIMIT, system=s, dtype="float32", engine_options=options[s])
            for s in ("moegen", "hf")}


@pytest.fixture(scope="module")
def gsm8k_runs(ckpt, gsm8k_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gsm8k_data.ENV_VAR, str(gsm8k_dir))
        return both(ckpt, "gsm8k_local", hf_batch=LIMIT)  # the task's default: 5-shot


@pytest.fixture(scope="module")
def mc_runs(ckpt, gsm8k_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gsm8k_data.ENV_VAR, str(gsm8k_dir))
        return both(ckpt, "gsm8k_mc_local", hf_batch=8)


# --- moegen vs hf --------------------------------------------------------------------------------
TIE = 1e-5  # top-2 logit gap below which float32 round-off may pick either token


def test_gsm8k_identical_responses(gsm8k_runs, ckpt, engine):
    """Same prompts, same responses. Greedy decoding is only defined up to float32 round-off:
    batched and single-sequence GEMMs differ by ~1e-7, which flips a near-tie of the random
    fixture's flat logits once in a few thousand tokens. So a response may differ only after a
    step where the reference (transformers, one sequence) has its top-2 logits within TIE."""
    ours, ref = (gsm8k_runs[s]["samples"]["gsm8k_local"] for s in ("moegen", "hf"))
    assert len(ours) == len(ref) == 2 * LIMIT  # one record per document and filter
    ref = {(r["doc_id"], r["filter"]): r for r in ref}
    contexts = task_contexts("gsm8k_local", LIMIT)
    differ = set()
    for r in ours:
        other = ref[(r["doc_id"], r["filter"])]
        assert r["prompt_hash"] == other["prompt_hash"] == hash_string(contexts[r["doc_id"]][0])
        if r["response"] != other["response"]:
            differ.add(r["doc_id"])
        else:
            assert r["filtered_response"] == other["filtered_response"] and r["metrics"] == other["metrics"]
    assert len(differ) <= 2, f"documents {sorted(differ)} differ"
    for doc_id in differ:
        texts = [x["response"] for x in (*ours, *ref.values()) if x["doc_id"] == doc_id]
        assert_differ_only_after_tie(ckpt, engine, contexts[doc_id], set(texts))
    assert {r["doc_id"] for r in ours} == set(range(LIMIT))
    assert all(isinstance(r["response"], str) and r["response"] for r in ours)


def task_contexts(task_name, limit):
    """doc_id -> (context, gen_kwargs) as simple_evaluate builds them (fewshot seed 1234)."""
    from moegen.eval.run import include_paths, task_manager
    task = task_manager([task_name], include_paths(None)).load([task_name])["tasks"][task_name]
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return {inst.doc_id: inst.args for inst in task.instances}


def assert_differ_only_after_tie(ckpt, engine, args, texts):
    from moegen.eval.lm_eval_backend import MoegenLM, cut_at_stops
    context, gen_kwargs = args
    lm = MoegenLM(engine=engine)
    ids = engine.tokenizer.encode(context)
    with torch.inference_mode():
        out = hf_model(str(ckpt)).generate(torch.tensor([ids]), max_new_tokens=gen_kwargs["max_gen_toks"],
                                           do_sample=False, eos_token_id=2, pad_token_id=0,
                                           output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(ids):].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    until = gen_kwargs["until"] + ["</s>"]
    single = cut_at_stops(lm.decode_generated(tokens), until)
    for text in texts - {single}:
        # the first step whose text departs from `text`: the choice there (or before) was a tie
        k = next((i for i in range(len(tokens))
                  if not _compatible(cut_at_stops(lm.decode_generated(tokens[:i + 1]), until), text)), None)
        assert k is not None, f"{text!r} differs from the reference {single!r} but agrees with every prefix"
        assert min(gaps[:k + 1]) < TIE, f"no near-tie before step {k}: top-2 gaps {gaps[:k + 1]}"


def _compatible(a: str, b: str) -> bool:
    a, b = a.rstrip("\ufffd"), b.rstrip("\ufffd")  # a cut multi-byte character decodes as U+FFFD
    return a.startswith(b) or b.startswith(a)


def test_gsm8k_identical_scores(gsm8k_runs):
    ours, ref = (gsm8k_runs[s]["results"]["gsm8k_local"] for s in ("moegen", "hf"))
    for filt in ("strict-match", "flexible-extract"):
        assert ours[f"exact_match,{filt}"] == ref[f"exact_match,{filt}"]
    assert gsm8k_runs["moegen"]["n-shot"]["gsm8k_local"] == 5


def test_gsm8k_mc_identical_acc(mc_runs):
    ours, ref = (mc_runs[s] for s in ("moegen", "hf"))
    assert ours["results"]["gsm8k_mc_local"]["acc,none"] == ref["results"]["gsm8k_mc_local"]["acc,none"]
    a, b = ours["samples"]["gsm8k_mc_local"], ref["samples"]["gsm8k_mc_local"]
    assert len(a) == len(b) == LIMIT
    for x, y in zip(a, b):
        assert x["doc_id"] == y["doc_id"] and x["prompt_hash"] == y["prompt_hash"]
        assert x["metrics"] == y["metrics"]
        ll_ours, ll_ref = ([c[0] for c in s["response"]] for s in (x, y))
        assert ll_ours == pytest.approx(ll_ref, abs=1e-4)  # float32 round-off only
        assert [c[1] for c in x["response"]] == [c[1] for c in y["response"]]


def test_result_is_plain_json(gsm8k_runs):
    res = gsm8k_runs["moegen"]
    assert json.loads(json.dumps(res)) == res
    assert res["system"] == "moegen" and res["tasks"] == ["gsm8k_local"]
    assert res["engine"]["decode_tokens"] > 0 and "engine" not in gsm8k_runs["hf"]
    assert set(res["samples"]["gsm8k_local"][0]) >= {"doc_id", "target", "response", "filtered_response", "metrics"}
    assert res["samples"]["gsm8k_local"][0]["target"].rstrip().endswith("#### 18")


def _requests(kind, args):
    from lm_eval.api.instance import Instance
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_generate_until_stop_strings_match_hf(ckpt, engine):
    """Stops mid-text, at the very start, after the first word's space, several per request."""
    from lm_eval.models.huggingface import HFLM
    from moegen.eval.lm_eval_backend import MoegenLM, cut_at_stops

    ours = MoegenLM(engine=engine)
    hf = HFLM(pretrained=str(ckpt), dtype="float32", device="cpu", batch_size=4)
    ctxs = ["Question: What is 2 + 3?\nAnswer:", "The capital of France is", "Once upon a time", "x"]
    free = ours.generate_until(_requests("generate_until", [(c, {"until": [], "max_gen_toks": 24}) for c in ctxs]),
                               disable_tqdm=True)
    assert free == hf.generate_until(_requests("generate_until", [(c, {"until": [], "max_gen_toks": 24}) for c in ctxs]),
                                     disable_tqdm=True)
    # greedy texts of this fixture: 'onal ПаepsepsepsonalRay...', 'lang lang lang Mrs...',
    # 'fees"? trouically...', 'account wetenschapp account...'
    word1 = free[1].split(" ")[0]
    stops = [[free[0][8:11]], [" " + word1], [free[2][2:4], free[2][6:9]], [free[3][:3]]]
    args = [(c, {"until": s, "max_gen_toks": 24, "do_sample": False}) for c, s in zip(ctxs, stops)]
    args.append((ctxs[0], {"until": [], "max_gen_toks": 5}))
    got = ours.generate_until(_requests("generate_until", args), disable_tqdm=True)
    assert got == hf.generate_until(_requests("generate_until", args), disable_tqdm=True)
    assert got[:4] == [cut_at_stops(t, s) for t, s in zip(free, stops)]
    assert got[1] == word1 and got[3] == ""  # the first word's own space is not part of the text


def test_loglikelihood_rolling_matches_direct(ckpt, engine):
    from moegen.eval.lm_eval_backend import MoegenLM

    L = 16
    lm = MoegenLM(engine=engine, max_length=L)
    texts = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether?", "Hello world"]
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    for text, value in zip(texts, got):
        toks = engine.tokenizer.encode(text, add_bos=False)
        windows = lm.rolling_windows(toks)
        assert [t for _, cont in windows for t in cont] == toks  # every token scored exactly once
        assert all(len(ctx) + len(cont) - 1 <= L for ctx, cont in windows)
        assert value == pytest.approx(direct_rolling(ckpt, toks, engine.tokenizer.bos_token_id, L), abs=1e-3)
    assert len(lm.rolling_windows(engine.tokenizer.encode(texts[0], add_bos=False))) > 2


def direct_rolling(ckpt, toks, bos, L) -> float:
    """Chunks of L tokens, each fed with the L tokens that end at its last prediction (BOS first)."""
    full, total = [bos, *toks], 0.0
    for a in range(0, len(toks), L):
        b = min(a + L, len(toks))      # predict toks[a:b] = full[a+1:b+1], from positions a..b-1
        lo = max(0, b - L)
        logp = torch.log_softmax(hf_logits(ckpt, full[lo:b]), -1)
        total += sum(float(logp[p - lo, full[p + 1]]) for p in range(a, b))
    return total


def test_loglikelihood_requests_and_empty_context(engine, ckpt):
    from moegen.eval.lm_eval_backend import MoegenLM

    lm = MoegenLM(engine=engine)
    (ll, greedy), (ll0, _) = lm.loglikelihood(_requests("loglikelihood", [("Question: 1+1?\nAnswer:", " 2"), ("", "Hello")]),
                                              disable_tqdm=True)
    ids = engine.tokenizer.encode("Question: 1+1?\nAnswer: 2")
    n_ctx = len(engine.tokenizer.encode("Question: 1+1?\nAnswer:"))
    logp = torch.log_softmax(hf_logits(ckpt, ids), -1)
    assert ll == pytest.approx(sum(float(logp[p - 1, ids[p]]) for p in range(n_ctx, len(ids))), abs=1e-4)
    hello = engine.tokenizer.encode("Hello")  # empty context: conditioned on BOS alone
    logp = torch.log_softmax(hf_logits(ckpt, hello), -1)
    assert ll0 == pytest.approx(sum(float(logp[p - 1, hello[p]]) for p in range(1, len(hello))), abs=1e-4)


def test_registered_with_model_args(ckpt):
    import lm_eval
    from lm_eval.api.registry import get_model

    from moegen.eval.run import task_manager, include_paths
    from moegen.eval.lm_eval_backend import MoegenLM

    assert get_model("moegen") is MoegenLM
    out = lm_eval.simple_evaluate(model="moegen", model_args=f"pretrained={ckpt},dtype=float32,max_batch=8,kv_cache_memory={KV}",
                                  tasks=["gsm8k_mc_local"], limit=2, num_fewshot=0,
                                  task_manager=task_manager(["gsm8k_mc_local"], include_paths(None)))
    assert 0 <= out["results"]["gsm8k_mc_local"]["acc,none"] <= 1


def test_fewshot_from_train_eval_from_test(gsm8k_dir):
    from moegen.eval.run import task_manager, include_paths

    loaded = task_manager(["gsm8k_local"], include_paths(None)).load(["gsm8k_local"])
    task = loaded["tasks"]["gsm8k_local"]
    train, test = (gsm8k_data.read_split(s, gsm8k_dir) for s in ("train", "test"))
    assert list(task.fewshot_docs()) == train and list(task.test_docs()) == test
    assert task.config.num_fewshot == 5


# --- task data ------------------------------------------------------------------------------------
def test_mc_distractors():
    assert gsm8k_data.distractors("18") == ["19", "17", "36"]
    assert gsm8k_data.distractors("0") == ["1", "-1", "10"]  # 0 x 2 would repeat the truth
    assert gsm8k_data.distractors("1") == ["2", "0", "11"]   # 1 x 2 would repeat 1 + 1
    row = gsm8k_data.mc_row({"question": "q", "answer": "so\n#### 1,200"})
    assert row["choices"] == ["1199", "1200", "1201", "2400"] and row["label"] == 1 and row["target"] == "1200"


def test_missing_data_file(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv(gsm8k_data.ENV_VAR, str(tmp_path))
    with pytest.raises(InputError) as e:
        run_eval(ckpt, ["gsm8k_local"], limit=1, dtype="float32")
    assert str(tmp_path / "train.jsonl") in str(e.value) and gsm8k_data.ENV_VAR in str(e.value)


@pytest.mark.parametrize("line, why", [
    ("{not json", "not valid JSON"),
    ('{"question": "q"}', "'answer'"),
    ('{"question": "q", "answer": "no final number"}', "#### <number>"),
    ('["q", "a"]', "JSON object"),
])
def test_malformed_row(ckpt, gsm8k_dir, tmp_path, monkeypatch, line, why):
    shutil.copyfile(gsm8k_dir / "train.jsonl", tmp_path / "train.jsonl")
    good = (gsm8k_dir / "test.jsonl").read_text().splitlines()[:2]
    (tmp_path / "test.jsonl").write_text("\n".join([*good, line]) + "\n")
    monkeypatch.setenv(gsm8k_data.ENV_VAR, str(tmp_path))
    with pytest.raises(InputError, match=why) as e:
        run_eval(ckpt, ["gsm8k_mc_local"], limit=1, dtype="float32")
    assert f"{tmp_path / 'test.jsonl'}:3:" in str(e.value)


# --- errors ---------------------------------------------------------------------------------------
def test_unknown_task(ckpt):
    with pytest.raises(InputError) as e:
        run_eval(ckpt, ["gsm8k_locl"], limit=1)
    msg = str(e.value)
    assert "'gsm8k_locl'" in msg and "did you mean" in msg and "gsm8k_local" in msg and "gsm8k_mc_local" in msg


def test_unknown_system_and_options(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="unknown system 'vllm'; choose one of moegen, hf"):
        run_eval(ckpt, ["gsm8k_local"], system="vllm")
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        run_eval(tmp_path, ["gsm8k_local"])
    with pytest.raises(ConfigError, match=r"\['max_batch'\] apply to system 'moegen' only; system 'hf' takes batch_size"):
        run_eval(ckpt, ["gsm8k_local"], system="hf", engine_options={"max_batch": 4})
    from moegen.eval.lm_eval_backend import MoegenLM
    with pytest.raises(ConfigError, match=r"unknown moegen model_args \['max_batchez'\].*max_batch"):
        MoegenLM(pretrained=str(ckpt), dtype="float32", max_batchez=4, kv_cache_memory=KV)


def test_unsupported_gen_kwargs(engine):
    from moegen.eval.lm_eval_backend import MoegenLM
    with pytest.raises(InputError, match=r"request 0: unsupported generation options \['repetition_penalty'\]"):
        MoegenLM(engine=engine).generate_until(
            _requests("generate_until", [("x", {"until": [], "repetition_penalty": 1.1})]), disable_tqdm=True)


# --- CLI ------------------------------------------------------------------------------------------
def _parser():
    from moegen.cli.eval import add_subparser
    parser = argparse.ArgumentParser(prog="moegen")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_eval(ckpt, tmp_path, capsys):
    out = tmp_path / "res.json"
    args = _parser().parse_args(["eval", "--model", str(ckpt), "--tasks", "gsm8k_mc_local,gsm8k_local", "--limit", "1",
                                 "--num-fewshot", "1", "--dtype", "float32", "--max-batch", "4", "--kv-cache-memory", KV,
                                 "--gen-kwargs", "max_gen_toks=8", "--out", str(out)])
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"gsm8k_local", "gsm8k_mc_local"} and res["num_fewshot"] == 1
    assert len(res["samples"]["gsm8k_local"]) == 2 and len(res["samples"]["gsm8k_mc_local"]) == 1
    assert res["engine"]["decode_tokens"] <= 8  # --gen-kwargs reached the engine
    printed = capsys.readouterr().out
    assert "exact_match" in printed and "flexible-extract" in printed and "acc" in printed and "decode" in printed


def test_cli_eval_errors(ckpt):
    args = _parser().parse_args(["eval", "--model", str(ckpt), "--tasks", "gsm8k_local", "--system", "vlm"])
    with pytest.raises(ConfigError, match="unknown system"):
        args.func(args)
