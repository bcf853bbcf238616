import json
import shutil

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from moegen.errors import InputError, TokenizerError
from moegen.checkpoints.fixture import mixtral_tokenizer_model
from moegen.tokenizer import SentencePieceTokenizer, load_tokenizer

TEXTS = [
    "Hello world", " Hello", "  two leading spaces", "a  b   c    d", "end.  Next sentence",
    "line1\nline2\n\nline4\n", "tab\there\t\tend", "\tx", "café naïve façade", "日本語のテキスト",
    "emoji 😀🚀 mixed", "12345 + 678 = 9999", "$1,234.56 and 7%", "", " ", "\n", "trailing  ",
    "ﬁ ligature, Ａ fullwidth", "x </s> y <s>",
]


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(mixtral_tokenizer_model()))


@pytest.fixture(scope="module")
def ckpt(tiny_fixture):
    return tiny_fixture("mixtral")


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_tokenizer(ckpt)


# transformers picks a different class per model_type: for mixtral it wants mistral-common's
# format (absent here) and falls back to TokenizersBackend, which runs tokenizer.json as written;
# for the others it honours tokenizer_class (LlamaTokenizer), which keeps only the vocab and
# merges of tokenizer.json and rebuilds the same Metaspace pipeline. Check both.
HF_CLASS = {"mixtral": "TokenizersBackend", "qwen3_moe": "LlamaTokenizer"}


@pytest.fixture(scope="module", params=sorted(HF_CLASS))
def hf(request, tiny_fixture):
    hf = AutoTokenizer.from_pretrained(tiny_fixture(request.param), local_files_only=True)
    assert type(hf).__name__ == HF_CLASS[request.param]
    return hf


def gsm8k(gsm8k_dir, n):
    with open(gsm8k_dir / "test.jsonl") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def test_uses_sentencepiece(tok):
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids, tok.vocab_size) == (1, 2, (2,), 32000)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_sentencepiece(tok, sp, text):
    assert tok.encode(text) == [1] + sp.encode(text)
    assert tok.encode(text, add_bos=False) == sp.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_continuation_keeps_leading_space(tok, sp):
    # A model continuing "Answer:" emits "▁The ▁answer ...": the same ids as encoding the
    # continuation alone without BOS (the dummy prefix becomes the real space).
    prompt, answer = tok.encode("Question: 6 x 7?\nAnswer:"), tok.encode("The answer is 42.", add_bos=False)
    assert tok.decode(answer) == " The answer is 42."
    assert sp.decode(answer) == "The answer is 42."  # plain sentencepiece loses it
    assert tok.decode(prompt + answer) == tok.decode(prompt) + tok.decode(answer)


def test_decode_skips_special_tokens(tok):
    assert tok.decode([1, 22557, 2]) == "Hello"
    assert tok.decode([0, 2]) == ""
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([32000])
    with pytest.raises(InputError):
        tok.encode(["batch", "of", "texts"])


def test_gsm8k_questions(tok, sp, gsm8k_dir):
    for row in gsm8k(gsm8k_dir, 20):
        q, a = row["question"], row["answer"]
        ids = tok.encode(q)
        assert ids == [1] + sp.encode(q) and tok.decode(ids) == q
        # Split a question + answer anywhere after the first text token: the two decodes
        # concatenate to the whole. (A prompt of BOS alone has no text for the first piece's
        # leading space to follow, so that split is excluded.)
        full = tok.encode(q + "\n" + a)
        for k in (2, len(full) // 3, len(full) // 2, len(full) - 1):
            assert tok.decode(full[:k]) + tok.decode(full[k:]) == q + "\n" + a


def test_autotokenizer_agrees_on_ordinary_text(tok, hf, gsm8k_dir):
    texts = [t for t in TEXTS if not t.startswith(" ") and "</s>" not in t]
    texts += [r["question"] for r in gsm8k(gsm8k_dir, 200)]
    for text in texts:
        assert hf(text).input_ids == tok.encode(text), text
        assert hf.decode(tok.encode(text), skip_special_tokens=True) == text


def test_autotokenizer_differences(tok, hf):
    """Where transformers' AutoTokenizer (a `tokenizers` BPE rebuilt from the fixture's
    tokenizer.json by LlamaTokenizer, legacy=True) departs from SentencePiece."""
    # 1. Leading whitespace: its Metaspace pre-tokenizer only prepends the "▁" dummy prefix when
    #    the text does not already start with a space, so one leading space is lost.
    assert tok.encode(" Hello") == [1, 28705, 22557]  # ▁ ▁Hello
    assert hf(" Hello").input_ids == [1, 22557]  # ▁Hello
    assert hf.decode(hf(" Hello").input_ids, skip_special_tokens=True) == "Hello"
    assert hf("  two").input_ids == [1] + tok.encode(" two", add_bos=False)
    # 2. Special-token text inside the input becomes control tokens; SentencePiece spells it out.
    assert hf("x </s> y").input_ids == [1, 1318, 28705, 2, 337]
    assert tok.encode("x </s> y") == [1, 1318, 1867, 28713, 28767, 337]
    # 3. Decoding a continuation drops its leading space (the Strip decoder), moegen keeps it.
    ids = tok.encode("is 42", add_bos=False)  # ▁is ▁ 4 2
    assert hf.decode(ids, skip_special_tokens=True) == "is 42" and tok.decode(ids) == " is 42"


def test_autotokenizer_offline(ckpt, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    assert (hf.bos_token, hf.eos_token, hf.unk_token, len(hf)) == ("<s>", "</s>", "<unk>", 32000)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "tokenizer.model" in msg and "tokenizer.json" in msg


def test_unreadable_sentencepiece_without_fallback(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)


def test_special_ids_from_config_files(tmp_path):
    shutil.copyfile(mixtral_tokenizer_model(), tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 7}))
    assert load_tokenizer(tmp_path).eos_token_ids == (7,)
    # generation_config.json wins, and may list several stop ids.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    t = load_tokenizer(tmp_path)
    assert (t.bos_token_id, t.eos_token_id, t.eos_token_ids) == (1, 2, (2, 5))
    assert t.decode([22557, 5]) == " Hello"  # stop ids are special: skipped


def test_hf_fallback(tmp_path, ckpt, tok):
    # Only tokenizer.json + tokenizer_config.json: moegen goes through AutoTokenizer.
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copyfile(ckpt / name, tmp_path / name)
    t = load_tokenizer(tmp_path)
    assert not isinstance(t, SentencePieceTokenizer)
    assert (t.bos_token_id, t.eos_token_ids, t.vocab_size) == (1, (2,), 32000)
    assert t.encode("Hello world") == tok.encode("Hello world")
    assert t.encode("Hello world", add_bos=False) == tok.encode("Hello world", add_bos=False)
    assert t.decode(t.encode("Hello world")) == "Hello world"
