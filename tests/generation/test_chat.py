"""Chat templates (moegen.tokenizer, Engine.chat, `moegen generate --chat`) against transformers'
apply_chat_template, and generation_config.json defaults (moegen.engine.params.GenerationDefaults)."""
import json
import shutil
from functools import lru_cache

import pytest
from transformers import AutoTokenizer

from moegen.cli import main
from moegen.engine import Engine, SamplingParams
from moegen.engine.params import GenerationDefaults
from moegen.errors import InputError, TokenizerError
from moegen.tokenizer import SentencePieceTokenizer, load_tokenizer
from tests.chat_templates import with_template

KV = "256MB"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "  Hi  there"}, {"role": "assistant", "content": " Hello!\n\nHow"},
     {"role": "user", "content": "Tell me  a story.\n"}],
    # special-token text inside a message, and a space right after a special token
    [{"role": "user", "content": "Ünïcödé 😀 tabs\tand </s> inside <s>  two</s>"}],
]


@pytest.fixture(scope="module")
def sp_ckpt(mistral_chat_fixture):
    """Mixtral with its SentencePiece tokenizer and Mistral's template."""
    return mistral_chat_fixture


@pytest.fixture(scope="module")
def bpe_ckpt(tiny_fixture, tmp_path_factory):
    """Qwen3-MoE with only its BPE tokenizer.json (moegen goes through transformers), ChatML in a file."""
    return with_template(tiny_fixture("qwen3_moe"), tmp_path_factory.mktemp("chat") / "qwen3", CHATML,
                         as_file=True, drop=("tokenizer.model",))


@pytest.fixture(scope="module")
def sp_engine(sp_ckpt):
    return Engine.from_pretrained(sp_ckpt, dtype="float32", kv_cache_memory=KV)


@lru_cache(maxsize=4)
def hf_tokenizer(ckpt):
    return AutoTokenizer.from_pretrained(ckpt, local_files_only=True)


def transformers_ids(ckpt, messages):
    return hf_tokenizer(ckpt).apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)


@pytest.mark.parametrize("which", ["sp_ckpt", "bpe_ckpt"])
def test_prompt_ids_equal_transformers(request, which):
    ckpt = request.getfixturevalue(which)
    tok = load_tokenizer(ckpt)
    assert isinstance(tok, SentencePieceTokenizer) == (which == "sp_ckpt")
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == transformers_ids(ckpt, messages)


def test_template_writes_the_only_bos(sp_ckpt):
    ids = load_tokenizer(sp_ckpt).apply_chat_template(CONVERSATIONS[1])
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1     # BOS once; the answer's EOS a token


def test_chat_equals_generate_on_the_template_ids(sp_engine):
    params = SamplingParams(max_new_tokens=6)
    chats = sp_engine.chat(CONVERSATIONS, params)
    ids = [sp_engine.tokenizer.apply_chat_template(m) for m in CONVERSATIONS]
    plain = sp_engine.generate(ids, params)
    assert [c.prompt_token_ids for c in chats] == ids
    assert [c.token_ids for c in chats] == [c.token_ids for c in plain]


def test_no_template_is_a_clear_error(tiny_fixture, tmp_path, capsys):
    ckpt = tiny_fixture("mixtral")
    with pytest.raises(TokenizerError, match="no chat template .*chat_template.jinja"):
        load_tokenizer(ckpt).apply_chat_template(CONVERSATIONS[0])
    rows = tmp_path / "chat.jsonl"
    rows.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    code = main(["generate", "--model", str(ckpt), "--input", str(rows), "--chat", "--out", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "2"])
    assert code == 2 and "no chat template" in capsys.readouterr().err


def test_bad_messages_are_named(sp_engine):
    with pytest.raises(InputError, match="conversation 1: message 0 must be an object with string 'role'"):
        sp_engine.chat([CONVERSATIONS[0], [{"content": "no role"}]])


def test_cli_chat_rows(sp_ckpt, sp_engine, tmp_path):
    rows, out = tmp_path / "chat.jsonl", tmp_path / "out.jsonl"
    rows.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    assert main(["generate", "--model", str(sp_ckpt), "--dtype", "float32", "--kv-cache-memory", KV, "--input", str(rows),
                 "--chat", "--out", str(out), "--max-new-tokens", "4", "--quiet"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = sp_engine.chat(CONVERSATIONS, SamplingParams(max_new_tokens=4))
    assert [r["token_ids"] for r in got] == [c.token_ids for c in want]


# --- generation_config.json -------------------------------------------------------------------------
def test_generation_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "eos_token_id": [2, 5]}))
    d = GenerationDefaults.read(tmp_path)
    assert d.eos_token_ids == (2, 5)
    p = d.params(max_new_tokens=3, temperature=None, top_p=0.5)          # None: unset
    assert (p.temperature, p.top_p, p.top_k) == (0.7, 0.5, 20)
    assert SamplingParams().greedy                                      # Python's default stays greedy


def test_sampling_defaults_need_do_sample(tmp_path):
    # transformers decodes greedily when do_sample is not set, whatever temperature the file names
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "eos_token_id": 2}))
    assert GenerationDefaults.read(tmp_path).params(max_new_tokens=1).greedy
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": -1}))
    with pytest.raises(InputError, match="generation_config.json: temperature must be"):
        GenerationDefaults.read(tmp_path)


def test_engine_stops_on_generation_config_eos(sp_ckpt, tmp_path):
    ckpt = shutil.copytree(sp_ckpt, tmp_path / "ckpt")
    first = Engine.from_pretrained(ckpt, dtype="float32", kv_cache_memory=KV).generate([[1, 22557]], SamplingParams(
        max_new_tokens=3, ignore_eos=True))[0].token_ids
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, first[1]]}))
    (ckpt / "tokenizer.model").unlink()                     # no tokenizer: generation_config still counts
    (ckpt / "tokenizer.json").unlink()
    engine = Engine.from_pretrained(ckpt, dtype="float32", kv_cache_memory=KV)
    assert engine.tokenizer is None and engine.eos_ids == (2, first[1])
    out = engine.generate([[1, 22557]], SamplingParams(max_new_tokens=3))[0]
    assert out.token_ids == first[:2] and out.finish_reason == "stop"


def test_cli_unset_sampling_takes_the_checkpoint_defaults(sp_ckpt, tmp_path):
    ckpt = shutil.copytree(sp_ckpt, tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.8, "top_k": 5}))
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"prompt_token_ids": [1, 22557]}) + "\n")

    def run(*flags):
        out = tmp_path / f"out{len(flags)}.jsonl"
        assert main(["generate", "--model", str(ckpt), "--dtype", "float32", "--kv-cache-memory", KV, "--input", str(rows),
                     "--out", str(out), "--max-new-tokens", "8", "--seed", "7", "--quiet", *flags]) == 0
        return json.loads(out.read_text())["token_ids"]

    engine = Engine.from_pretrained(ckpt, dtype="float32", kv_cache_memory=KV)
    sampled = engine.generate([[1, 22557]], SamplingParams(max_new_tokens=8, temperature=0.8, top_k=5, seed=7))
    greedy = engine.generate([[1, 22557]], SamplingParams(max_new_tokens=8))
    assert run() == sampled[0].token_ids
    assert run("--temperature", "0") == greedy[0].token_ids


# --- trained weights ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.trained
def test_smollm2_chat(tmp_path_factory):
    """SmolLM2-135M-Instruct upcycled into Mixtral (real BPE tokenizer, ChatML template with
    <|im_end|> as EOS): the template ids equal transformers', and a chat answers and stops."""
    from moegen.checkpoints import fixture
    if "smollm2" not in getattr(fixture, "TRAINED_PRESETS", ()):
        pytest.skip("no smollm2 fixture preset")
    ckpt = fixture.build_fixture("mixtral", "smollm2", seed=0, out=tmp_path_factory.mktemp("smol") / "ckpt")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    engine = Engine.from_pretrained(ckpt, dtype="float32", kv_cache_memory=KV)
    assert engine.tokenizer.apply_chat_template(messages) == transformers_ids(ckpt, messages)
    out = engine.chat([messages], SamplingParams(max_new_tokens=24))[0]
    assert out.finish_reason == "stop" and "Paris" in out.text
