"""The tokenizer moegen uses at run time.

A checkpoint with a SentencePiece `tokenizer.model` (Mixtral, Llama 2, Mistral) is tokenized by
`sentencepiece` itself, which gives the ids the model was trained on; transformers 5 re-creates
such tokenizers as a `tokenizers` BPE that differs on leading spaces and on special-token text
(and, with merges from its own converter, on runs of spaces).
Other checkpoints (tokenizer.json: Qwen, OLMoE, DeepSeek) go through `transformers.AutoTokenizer`.
"""
import json
from pathlib import Path

from moegen.errors import InputError, TokenizerError

SP_FILE = "tokenizer.model"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class Tokenizer:
    """Text <-> token ids. `eos_token_ids` holds every id that ends generation."""

    bos_token_id: "int | None"
    eos_token_id: "int | None"
    eos_token_ids: "tuple[int, ...]"
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True) -> "list[int]":
        raise NotImplementedError

    def decode(self, ids: "list[int]") -> str:
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """A token's own spelling, special tokens included ("</s>"), which decode() skips."""
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_dir: Path):
        import sentencepiece as spm

        path = model_dir / SP_FILE
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()
        sp_bos, sp_eos = self._sp.bos_id(), self._sp.eos_id()  # -1 when the model has none
        self.bos_token_id, self.eos_token_ids = _special_ids(
            model_dir, self._sp.piece_to_id, sp_bos if sp_bos >= 0 else None, [sp_eos] if sp_eos >= 0 else [])
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self._skip = {i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i)}
        self._skip |= {i for i in (self.bos_token_id, *self.eos_token_ids) if i is not None}

    def encode(self, text: str, add_bos: bool = True) -> "list[int]":
        _check_text(text)
        ids = self._sp.encode(text)
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def decode(self, ids: "list[int]") -> str:
        """Decode, skipping special tokens.

        Ids that start with BOS are a whole encoded text: the first piece's leading space is the
        dummy prefix SentencePiece adds, and is dropped (decode(encode(t)) == t). Any other ids
        are a continuation (generated tokens), whose leading space is real and is kept, so
        decode(prompt_ids + new_ids) == decode(prompt_ids) + decode(new_ids).
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids {bad[:5]} outside the vocabulary (size {self.vocab_size})")
        kept = [i for i in ids if i not in self._skip]
        text = self._sp.decode(kept)
        whole = ids[:1] == [self.bos_token_id]
        if kept and not whole and self._sp.id_to_piece(kept[0]).startswith("▁"):
            text = " " + text  # sentencepiece stripped it as if it were the dummy prefix
        return text

    def token_text(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


class HFTokenizer(Tokenizer):
    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as e:  # transformers raises many types; all mean "no usable tokenizer"
            raise TokenizerError(f"{model_dir}: transformers.AutoTokenizer could not load it: {e}") from e
        tok = self._tok
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        self.bos_token_id, self.eos_token_ids = _special_ids(
            model_dir, tok.convert_tokens_to_ids, tok.bos_token_id, eos)
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.vocab_size = len(tok)
        # Follow the tokenizer's own convention: Llama-style tokenizers start with BOS, Qwen-style
        # ones never do even though config.json names a bos_token_id.
        with_special = tok.encode("a", add_special_tokens=True)
        self._adds_bos = self.bos_token_id is not None and with_special[:1] == [self.bos_token_id]

    def encode(self, text: str, add_bos: bool = True) -> "list[int]":
        _check_text(text)
        ids = self._tok.encode(text, add_special_tokens=False)
        return [self.bos_token_id, *ids] if add_bos and self._adds_bos else ids

    def decode(self, ids: "list[int]") -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self._tok.convert_ids_to_tokens(int(token_id))


def load_tokenizer(model_dir: "str | Path") -> Tokenizer:
    """The tokenizer of the checkpoint in `model_dir` (see the module docstring for which)."""
    d = Path(model_dir)
    sp_error = None
    if (d / SP_FILE).is_file():
        try:
            return SentencePieceTokenizer(d)
        except RuntimeError as e:  # e.g. a tiktoken file named tokenizer.model
            sp_error = e
    if any((d / f).is_file() for f in HF_FILES):
        return HFTokenizer(d)
    why = f"; {SP_FILE} is not a SentencePiece model ({sp_error})" if sp_error else ""
    raise TokenizerError(f"{d}: no usable tokenizer; looked for {SP_FILE} (SentencePiece) and "
                         f"{', '.join(HF_FILES)} (transformers){why}")


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise InputError(f"expected text as str, got {type(text).__name__}")


def _special_ids(model_dir: Path, token_to_id, bos, eos: "list[int]"):
    """BOS id and EOS ids: the first of generation_config.json, config.json, tokenizer_config.json
    that names them wins, over the tokenizer's own defaults `bos`/`eos`. generation_config comes
    first because it is what the model's authors set generation to stop on (may be a list)."""
    found = {}
    for name in ("generation_config.json", "config.json"):
        data = _read_json(model_dir / name)
        for key in ("bos_token_id", "eos_token_id"):
            if key not in found and data.get(key) is not None:
                found[key] = data[key]
    data = _read_json(model_dir / "tokenizer_config.json")
    for key in ("bos_token", "eos_token"):
        token = data.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if f"{key}_id" not in found and isinstance(token, str):
            found[f"{key}_id"] = token_to_id(token)
    bos = found.get("bos_token_id", bos)
    eos = found.get("eos_token_id", eos)
    eos = eos if isinstance(eos, list) else [eos]
    return bos, tuple(int(i) for i in eos)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: unreadable JSON: {e}") from e
    return data if isinstance(data, dict) else {}
