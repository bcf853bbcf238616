"""SamplingParams(logprobs=k) and prompt_logprobs=k against a float32 log_softmax of transformers'
logits; the raw-distribution convention for sampled tokens; rows, CLI flags and OpenAI batch files."""
import json
import math
import shutil

import pytest
import torch

import moegen.engine.sampler as sampler
from moegen.cli import main
from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.engine.runner import Runner
from moegen.engine.sampler import filter_logits
from moegen.errors import InputError
from moegen.generation import openai_batch
from moegen.generation.openai_batch import CHAT, COMPLETIONS
from moegen.loader import load_model
from moegen.tokenizer import load_tokenizer
from tests.hf_reference import hf_logits

ARCHS = ("mixtral", "deepseek_v2", "qwen2_moe")      # GQA, MLA, a Qwen with a gated shared expert
TEXTS = ("Janet has ducks that lay eggs every day.", "Weng earns $12 an hour", "A robe takes 2 bolts")
TOL = 1e-4
OLD_ROW_KEYS = {"index", "prompt_token_ids", "token_ids", "text", "finish_reason"}


def make_engine(path, **kw):
    return Engine(load_model(path, "float32"), load_tokenizer(path), EngineConfig(kv_cache_bytes=32 << 20, **kw))


def prompts_of(path):
    tok = load_tokenizer(path)
    return [tok.encode(t) for t in TEXTS]


def reference_logprobs(path, seq: list[int]) -> torch.Tensor:
    """[len(seq), V] float64 log-probabilities of transformers' float32 logits (row j predicts seq[j + 1])."""
    return torch.log_softmax(hf_logits(path, seq).double(), -1)


def check_entries(entries, reference: torch.Tensor, targets: list[int], k: int) -> None:
    """Each entry holds the target first, then the k most likely, with the reference's values."""
    assert len(entries) == len(targets) == len(reference)
    for entry, ref, target in zip(entries, reference, targets):
        ids = list(entry)
        assert ids[0] == target and len(set(ids)) == len(ids)
        values = torch.tensor(list(entry.values()), dtype=torch.float64)
        assert torch.allclose(values, ref[ids], atol=TOL)
        if k == 0:
            assert len(entry) == 1
            continue
        # the alternatives are the k most likely: ours (the k largest of the entry) equal the reference's k
        # largest values, which also holds when near-ties order them differently
        kth = ref.topk(k).values
        assert torch.allclose(values.sort(descending=True).values[:k], kth, atol=TOL)
        # k entries only when the target is itself among the k most likely
        assert len(entry) == k + 1 or entry[target] >= kth[-1].item() - TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_generated_logprobs_equal_transformers_log_softmax(arch, tiny_fixture):
    path = tiny_fixture(arch)
    prompts = prompts_of(path)
    ks = [3, 0, None]                 # one batch: different k, and a sequence that asks for nothing
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=k) for k in ks]
    outs = make_engine(path, max_batch=3, attn_micro_batch=2).generate(prompts, params)
    for prompt, out, k in zip(prompts, outs, ks):
        if k is None:
            assert out.logprobs is None and out.prompt_logprobs is None
            continue
        ref = reference_logprobs(path, prompt + out.token_ids)[len(prompt) - 1:-1]
        check_entries(out.logprobs, ref, out.token_ids, k)
        assert out.token_ids == ref.argmax(-1).tolist()      # greedy: the chosen token is the most likely


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logprobs_equal_transformers_log_softmax(arch, tiny_fixture, monkeypatch):
    monkeypatch.setattr(sampler, "LOGPROB_ROWS", 4)        # prompts longer than a chunk: several chunks each
    path = tiny_fixture(arch)
    prompts = prompts_of(path)
    engine = make_engine(path)
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
    ks = [4, None, 0]
    params = [SamplingParams(max_new_tokens=4, ignore_eos=True, prompt_logprobs=k) for k in ks]
    outs = engine.generate(prompts, params)
    for prompt, out, before, k in zip(prompts, outs, plain, ks):
        assert out.token_ids == before.token_ids     # the KV this prefill wrote serves the decode steps alike
        assert out.logprobs is None
        if k is None:
            assert out.prompt_logprobs is None
            continue
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        check_entries(out.prompt_logprobs[1:], reference_logprobs(path, prompt)[:-1], prompt[1:], k)


def test_sampled_tokens_report_the_unfiltered_distribution(tiny_fixture):
    """vLLM's default (logprobs_mode="raw_logprobs"): log_softmax of the raw logits, before the
    temperature and top-k the token was drawn under."""
    path = tiny_fixture("qwen3_moe")
    prompt = prompts_of(path)[0]
    params = SamplingParams(max_new_tokens=6, temperature=1.5, top_k=3, seed=5, ignore_eos=True, logprobs=2)
    out = make_engine(path).generate([prompt], params)[0]
    logits = hf_logits(path, prompt + out.token_ids)[len(prompt) - 1:-1]
    raw = torch.log_softmax(logits.double(), -1)
    check_entries(out.logprobs, raw, out.token_ids, 2)
    filtered = [torch.log_softmax(filter_logits(row, params), -1)[t].item() for row, t in zip(logits, out.token_ids)]
    reported = [entry[t] for entry, t in zip(out.logprobs, out.token_ids)]
    # the filtered distribution keeps 3 tokens, so its log-probabilities are >= about log(1/3): far apart
    assert all(f - r > 1.0 for f, r in zip(filtered, reported))


def test_forked_samples_each_report_their_own_tokens_and_share_the_prompts(tiny_fixture):
    path = tiny_fixture("deepseek_v2")
    prompt = prompts_of(path)[2]
    params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3, n=3, ignore_eos=True, logprobs=1,
                            prompt_logprobs=2)
    out = make_engine(path).generate([prompt], params)[0]
    assert len(out.samples) == 3 and len({tuple(s.token_ids) for s in out.samples}) > 1
    check_entries(out.prompt_logprobs[1:], reference_logprobs(path, prompt)[:-1], prompt[1:], 2)
    for sample in out.samples:
        assert sample.prompt_logprobs == out.prompt_logprobs
        ref = reference_logprobs(path, prompt + sample.token_ids)[len(prompt) - 1:-1]
        check_entries(sample.logprobs, ref, sample.token_ids, 1)


def test_the_whole_vocabulary_is_a_distribution(tiny_fixture):
    path = tiny_fixture("mixtral")
    engine = make_engine(path)
    vocab = engine.model.vocab_size
    out = engine.generate([prompts_of(path)[1]], SamplingParams(max_new_tokens=1, logprobs=vocab))[0]
    (entry,) = out.logprobs
    assert len(entry) == vocab
    assert math.isclose(sum(math.exp(v) for v in entry.values()), 1.0, rel_tol=1e-4)


def test_no_logprobs_run_computes_none_and_rows_are_unchanged(tiny_fixture, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("log-probabilities computed for a run that asked for none")

    monkeypatch.setattr(sampler, "token_logprobs", refuse)
    monkeypatch.setattr(Runner, "prefill_with_prompt_states", refuse)
    path = tiny_fixture("mixtral")
    outs = make_engine(path).generate(prompts_of(path), SamplingParams(max_new_tokens=3))
    assert all(o.logprobs is None and o.prompt_logprobs is None for o in outs)
    assert all(set(o.to_row()) == OLD_ROW_KEYS for o in outs)


@pytest.mark.parametrize("field, value", [("logprobs", -1), ("prompt_logprobs", -2), ("logprobs", True),
                                          ("prompt_logprobs", 1.5)])
def test_bad_counts_are_input_errors(field, value):
    with pytest.raises(InputError, match=f"{field} must be None or an integer >= 0"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_more_than_the_vocabulary_is_an_input_error(field, tiny_fixture):
    engine = make_engine(tiny_fixture("mixtral"))
    vocab = engine.model.vocab_size
    with pytest.raises(InputError, match=f"prompt 1: {field}={vocab + 1} is more than the model's vocabulary"):
        engine.generate([[1, 415], [1, 2936]], [SamplingParams(), SamplingParams(**{field: vocab + 1})])


# --- moegen generate -------------------------------------------------------------------------------
def run_generate(tmp_path, model, *extra):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS[:2]))
    code = main(["generate", "--model", str(model), "--input", str(src), "--out", str(out), "--max-new-tokens", "4",
                 "--dtype", "float32", "--quiet", "--kv-cache-memory", "16MB", "--ignore-eos", "--overwrite", *extra])
    return code, [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else None


def test_cli_rows_carry_logprobs_only_when_asked(tmp_path, tiny_fixture):
    path = tiny_fixture("mixtral")
    code, plain = run_generate(tmp_path, path)
    assert code == 0 and all(set(r) == OLD_ROW_KEYS for r in plain)
    code, rows = run_generate(tmp_path, path, "--logprobs", "2", "--prompt-logprobs", "1")
    assert code == 0
    for row in rows:
        assert set(row) == OLD_ROW_KEYS | {"logprobs", "prompt_logprobs"}
        assert [list(d)[0] for d in row["logprobs"]] == [str(t) for t in row["token_ids"]]     # chosen first
        assert all(len(d) in (2, 3) for d in row["logprobs"])
        assert row["prompt_logprobs"][0] is None
        assert [list(d)[0] for d in row["prompt_logprobs"][1:]] == [str(t) for t in row["prompt_token_ids"][1:]]
        ref = reference_logprobs(path, row["prompt_token_ids"] + row["token_ids"])
        n = len(row["prompt_token_ids"])
        for j, entry in enumerate(row["prompt_logprobs"][1:] + row["logprobs"]):
            assert all(abs(v - ref[j, int(t)].item()) < TOL for t, v in entry.items())
        assert row["token_ids"] == ref[n - 1:-1].argmax(-1).tolist()


@pytest.mark.parametrize("flags, message", [
    (["--logprobs", "-1"], "logprobs must be None or an integer >= 0"),
    (["--prompt-logprobs", "1", "--format", "openai-batch"], "--logprobs / --prompt-logprobs are for --format prompts"),
])
def test_cli_bad_logprob_flags_are_one_line_errors(flags, message, tmp_path, tiny_fixture, capsys):
    code, rows = run_generate(tmp_path, tiny_fixture("mixtral"), *flags)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and rows is None


# --- OpenAI batch files ------------------------------------------------------------------------------
PLAIN_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def chat_engine(tiny_fixture, tmp_path_factory):
    ckpt = shutil.copytree(tiny_fixture("mixtral"), tmp_path_factory.mktemp("logprobs") / "ckpt")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": PLAIN_TEMPLATE}))
    return Engine.from_pretrained(ckpt, dtype="float32", kv_cache_memory="64MB")


def batch_rows(engine, bodies: dict) -> dict:
    lines = [(f"b:{i}", json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}))
             for i, (cid, (url, body)) in enumerate(bodies.items())]
    return {r["custom_id"]: r for r in openai_batch.run_batch(engine, lines, "tiny", max_new_tokens=4)}


def test_openai_batch_logprobs_in_openai_shapes(chat_engine):
    messages = [{"role": "user", "content": TEXTS[0]}]
    rows = batch_rows(chat_engine, {
        "chat": (CHAT, {"messages": messages, "temperature": 0, "logprobs": True, "top_logprobs": 2}),
        "text": (COMPLETIONS, {"prompt": TEXTS[1], "temperature": 0, "logprobs": 1}),
        "none": (COMPLETIONS, {"prompt": TEXTS[1], "temperature": 0, "logprobs": False}),
    })
    text_of = openai_batch.token_strings(chat_engine.tokenizer)
    greedy = dict(max_new_tokens=4, logprobs=2)
    chat_want = chat_engine.chat([messages], SamplingParams(**greedy))[0]
    (choice,) = rows["chat"]["response"]["body"]["choices"]
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [text_of(t) for t in chat_want.token_ids]
    for c, t, want in zip(content, chat_want.token_ids, chat_want.logprobs):
        assert c["bytes"] == list(c["token"].encode("utf-8")) and abs(c["logprob"] - want[t]) < 1e-5
        top = sorted(want.items(), key=lambda kv: -kv[1])[:2]
        assert [a["token"] for a in c["top_logprobs"]] == [text_of(i) for i, _ in top]
        assert all(abs(a["logprob"] - lp) < 1e-5 for a, (_, lp) in zip(c["top_logprobs"], top))

    text_want = chat_engine.generate([TEXTS[1]], SamplingParams(**{**greedy, "logprobs": 1}))[0]
    (choice,) = rows["text"]["response"]["body"]["choices"]
    lp = choice["logprobs"]
    assert lp["tokens"] == [text_of(t) for t in text_want.token_ids]
    assert all(abs(a - want[t]) < 1e-5 for a, t, want in zip(lp["token_logprobs"], text_want.token_ids,
                                                               text_want.logprobs))
    assert [list(d) for d in lp["top_logprobs"]] == [[text_of(t) for t in want] for want in text_want.logprobs]
    assert lp["text_offset"] == [sum(len(s) for s in lp["tokens"][:j]) for j in range(len(lp["tokens"]))]
    assert rows["none"]["response"]["body"]["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("url, body, message", [
    (CHAT, {"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    (CHAT, {"logprobs": 3}, "logprobs must be true or false"),
    (CHAT, {"logprobs": True, "top_logprobs": -1}, "top_logprobs must be an integer >= 0"),
    (COMPLETIONS, {"logprobs": "5"}, "logprobs must be an integer >= 0"),
    (COMPLETIONS, {"logprobs": 2, "top_logprobs": 2}, "unsupported body field(s) top_logprobs"),
    (COMPLETIONS, {"logprobs": 10 ** 6}, "is more than the model's vocabulary"),
])
def test_openai_batch_bad_logprob_fields_are_error_rows(chat_engine, url, body, message):
    prompt = {"messages": [{"role": "user", "content": "Hi"}]} if url == CHAT else {"prompt": "Hi"}
    rows = batch_rows(chat_engine, {"bad": (url, {**prompt, **body}), "ok": (COMPLETIONS, {"prompt": "Hi"})})
    assert message in rows["bad"]["error"]["message"]
    assert rows["ok"]["error"] is None
