"""OpenAI batch files (moegen.generation.openai_batch, `moegen generate --format openai-batch`)."""
import json
from types import SimpleNamespace

import pytest

from moegen.cli import main
from moegen.engine import Engine, SamplingParams
from moegen.engine.params import GenerationDefaults
from moegen.generation import openai_batch
from moegen.generation.openai_batch import CHAT, COMPLETIONS

KV = "256MB"
CHAT_MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


def request(custom_id, url, body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


LINES = [
    request("chat", CHAT, {"messages": CHAT_MESSAGES, "max_completion_tokens": 5, "temperature": 0}),
    request("text", COMPLETIONS, {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "n": 2}),
    "{not json",
    request("url", "/v1/embeddings", {"input": "x"}),
    json.dumps({"custom_id": "nobody", "method": "POST", "url": COMPLETIONS}),
    request("penalty", COMPLETIONS, {"prompt": "Hi", "presence_penalty": 0.5}),
    request("noop", COMPLETIONS, {"prompt": "Hi", "max_tokens": 2, "temperature": 0, "stream": False}),
    request("long", COMPLETIONS, {"prompt": [1] * 5000, "max_tokens": 2}),
    request("ids", COMPLETIONS, {"prompt": [1, 22557], "max_tokens": 3, "temperature": 0, "stop": ["\n"]}),
]
FAILED = {"url", "nobody", "penalty", "long", None}        # None: the line that is not JSON


@pytest.fixture(scope="module")
def ckpt(mistral_chat_fixture):
    return mistral_chat_fixture


@pytest.fixture(scope="module")
def engine(ckpt):
    return Engine.from_pretrained(ckpt, dtype="float32", kv_cache_memory=KV)


@pytest.fixture(scope="module")
def rows(engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("batch") / "batch.jsonl"
    path.write_text("\n".join(LINES[:4]) + "\n\n" + "\n".join(LINES[4:]) + "\n")   # a blank line is skipped
    return openai_batch.run_batch(engine, openai_batch.read_batch(path), "tiny", max_new_tokens=3)


def by_id(rows):
    return {r["custom_id"]: r for r in rows}


def test_one_row_per_request_in_input_order(rows):
    ids = [json.loads(line)["custom_id"] if line.startswith("{\"") else None for line in LINES]
    assert [r["custom_id"] for r in rows] == ids
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["custom_id"] for r in rows if r["error"] is not None} == FAILED


def test_error_rows(rows):
    for r in rows:
        if r["error"] is None:
            continue
        assert r["response"]["status_code"] == 400
        assert r["response"]["body"]["error"]["message"] == r["error"]["message"]
        assert r["error"]["code"] == "invalid_request"
    errors = {r["custom_id"]: r["error"]["message"] for r in rows if r["error"]}
    assert "batch.jsonl:3: not valid JSON" in errors[None]
    assert "'/v1/embeddings' is not served" in errors["url"]
    assert "'body' must be a JSON object" in errors["nobody"]
    assert "unsupported body field(s) presence_penalty" in errors["penalty"]
    assert "5000 tokens" in errors["long"]


def test_chat_response_equals_engine_chat(rows, engine):
    r = by_id(rows)["chat"]["response"]
    assert r["status_code"] == 200
    body = r["body"]
    want = engine.chat([CHAT_MESSAGES], SamplingParams(max_new_tokens=5))[0]
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"] == [{"index": 0, "finish_reason": want.finish_reason, "logprobs": None,
                                "message": {"role": "assistant", "content": want.text}}]
    assert body["usage"] == {"prompt_tokens": len(want.prompt_token_ids), "completion_tokens": len(want.token_ids),
                             "total_tokens": len(want.prompt_token_ids) + len(want.token_ids)}


def test_completion_with_n_choices(rows, engine):
    body = by_id(rows)["text"]["response"]["body"]
    want = engine.generate(["Once upon a time"], SamplingParams(max_new_tokens=4))[0]
    assert body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["text"] == want.text for c in body["choices"])              # greedy: both alike
    assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    assert body["usage"]["completion_tokens"] == 2 * len(want.token_ids)


def test_token_id_prompt_and_default_max_tokens(rows):
    assert by_id(rows)["ids"]["response"]["body"]["usage"]["prompt_tokens"] == 2
    assert by_id(rows)["noop"]["response"]["body"]["usage"]["completion_tokens"] <= 2


def test_valid_rows_go_to_the_engine_in_one_call(engine, monkeypatch):
    calls = []
    real = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, *a, **k: calls.append(len(a[0])) or real(self, *a, **k))
    lines = [(f"b:{i}", line) for i, line in enumerate(LINES, 1)]
    openai_batch.run_batch(engine, lines, "tiny", max_new_tokens=2)
    assert calls == [4]                      # 4 served rows; the one with n=2 is one request of n=2


def test_n_choices_are_samples_of_one_prefill(engine):
    """A seeded row with n=3 answers the engine's own n=3 samples (distinct seeds), prefilled once."""
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3}
    lines = [("b:1", request("s", COMPLETIONS, body))]
    engine.reset_stats()
    got = openai_batch.run_batch(engine, lines, "tiny", max_new_tokens=6)[0]["response"]["body"]
    assert engine.stats.prompt_tokens_computed == got["usage"]["prompt_tokens"]     # one prefill, not n
    want = engine.generate(["Once upon a time"], SamplingParams(max_new_tokens=6, temperature=1.0, seed=7, n=3))[0].samples
    assert [c["text"] for c in got["choices"]] == [w.text for w in want]
    assert len({w.text for w in want}) > 1   # the samples differ: not one seed copied n times


def test_unset_sampling_is_checkpoint_then_openai_default():
    body = {"prompt": "x"}
    plain = SimpleNamespace(generation_defaults=GenerationDefaults())
    assert openai_batch.sampling_params(plain, body, 4).temperature == 1.0           # OpenAI's default
    tuned = SimpleNamespace(generation_defaults=GenerationDefaults(sampling={"temperature": 0.6, "top_k": 20}))
    p = openai_batch.sampling_params(tuned, {**body, "top_k": 3, "seed": 1, "stop": "\n"}, 4)
    assert (p.temperature, p.top_k, p.seed, p.stop, p.max_new_tokens) == (0.6, 3, 1, ["\n"], 4)


def test_cli_writes_the_batch_file(ckpt, tmp_path, capsys):
    src, out = tmp_path / "batch.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(LINES) + "\n")
    assert main(["generate", "--model", str(ckpt), "--dtype", "float32", "--kv-cache-memory", KV, "--input", str(src),
                 "--format", "openai-batch", "--out", str(out), "--max-new-tokens", "3", "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(LINES) and {r["custom_id"] for r in rows if r["error"]} == FAILED
    summary = json.loads(capsys.readouterr().out)
    assert (summary["requests"], summary["failed"]) == (len(LINES), len(FAILED))


def test_a_batch_file_resumes_from_its_journal(ckpt, tmp_path, capsys, kill_journal_after):
    """A run that dies after two answers keeps them; the re-run answers only the other lines, and
    the output is what one uninterrupted run writes (ids aside), in input order."""
    src = tmp_path / "batch.jsonl"
    src.write_text("\n".join(LINES) + "\n")
    args = ["generate", "--model", str(ckpt), "--dtype", "float32", "--kv-cache-memory", KV, "--input", str(src),
            "--format", "openai-batch", "--max-new-tokens", "3", "--quiet"]

    def answers(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [(r["custom_id"], r["index"], r["error"], r["response"]["status_code"],
                 json.dumps(r["response"]["body"].get("choices"))) for r in rows]

    main([*args, "--out", str(tmp_path / "whole.jsonl")])
    capsys.readouterr()
    kill_journal_after(2)
    with pytest.raises(RuntimeError, match="worker died"):
        main([*args, "--out", str(tmp_path / "resumed.jsonl")])
    kill_journal_after(None)
    main([*args, "--out", str(tmp_path / "resumed.jsonl")])
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows"], summary["resumed_rows"], summary["generated_rows"]) == (len(LINES), 2, len(LINES) - 2)
    assert answers(tmp_path / "resumed.jsonl") == answers(tmp_path / "whole.jsonl")
