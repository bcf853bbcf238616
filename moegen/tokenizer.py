"""The tokenizer moegen uses at run time.

A checkpoint with a SentencePiece `tokenizer.model` (Mixtral, Llama 2, Mistral) is tokenized by
`sentencepiece` itself, which gives the ids the model was trained on; transformers 5 re-creates
such tokenizers as a `tokenizers` BPE that differs on leading spaces and on special-token text
(and, with merges from its own converter, on runs of spaces).
Other checkpoints (tokenizer.json: Qwen, OLMoE, DeepSeek) go through `transformers.AutoTokenizer`.

Chat: a conversation is rendered by the checkpoint's chat template (`chat_template.jinja`, else
`chat_template` in tokenizer_config.json) with transformers' renderer, and its text tokenized as
transformers' `apply_chat_template(..., tokenize=True)` does: special-token text the template
writes ("<s>", "</s>") is that token, and no BOS is added on top of the one the template writes.
"""
import json
import logging
import re
from pathlib import Path

from moegen.errors import InputError, TokenizerError
from moegen.generation_config import read_generation_config

SP_FILE = "tokenizer.model"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """Text <-> token ids. `eos_token_ids` holds every id that ends generation; `chat_template`
    is the checkpoint's (default) chat template, None when it has none."""

    bos_token_id: "int | None"
    eos_token_id: "int | None"
    eos_token_ids: "tuple[int, ...]"
    vocab_size: int
    model_dir: Path
    chat_template: "str | None" = None

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = False) -> "list[int]":
        """parse_special: special-token text ("</s>") is that token, as transformers always has it."""
        raise NotImplementedError

    def decode(self, ids: "list[int]") -> str:
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """A token's own spelling, special tokens included ("</s>"), which decode() skips."""
        raise NotImplementedError

    # --- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages, where: str = "conversation") -> "list[int]":
        """Prompt ids of a conversation with the assistant's turn opened: the ids of transformers'
        apply_chat_template(messages, add_generation_prompt=True, tokenize=True)."""
        return self.encode(self.render_chat(messages, where=where), add_bos=False, parse_special=True)

    def render_chat(self, messages, add_generation_prompt: bool = True, continue_final_message: bool = False,
                    where: str = "conversation") -> str:
        """The text the chat template makes of a conversation (lists of {"role", "content"})."""
        from jinja2 import TemplateError

        check_messages(messages, where)
        if self.chat_template is None:
            raise TokenizerError(f"{self.model_dir}: the checkpoint has no chat template (looked for "
                                 f"{CHAT_TEMPLATE_FILE} and 'chat_template' in tokenizer_config.json); "
                                 "chat needs one, plain prompts do not")
        try:
            return self._render(messages, add_generation_prompt, continue_final_message)
        except (TemplateError, ValueError) as e:    # the template's raise_exception(), or transformers' checks
            raise InputError(f"{where}: the chat template refused it: {e}") from e

    def _render(self, messages, add_generation_prompt: bool, continue_final_message: bool) -> str:
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
        self._special_ids = {self._sp.id_to_piece(i): i for i in self._skip}
        # longest first, so that a special token that contains another is matched whole
        alternatives = sorted(self._special_ids, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        self.model_dir = model_dir
        self.chat_template = read_chat_template(model_dir)
        ids = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id, "unk_token": self._sp.unk_id()}
        self._special_texts = _special_texts(model_dir, ids, self._sp.id_to_piece)

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = False) -> "list[int]":
        _check_text(text)
        ids = self._encode_parsed(text) if parse_special else self._sp.encode(text)
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def _encode_parsed(self, text: str) -> "list[int]":
        """Special-token text as its token. The text before the first one is encoded as encode()
        has it; text after one starts a word as transformers' (legacy) Llama tokenizer splits it: a
        space right after the special token is that word's "▁", not one more."""
        parts = self._special_re.split(text)        # text, special, text, special, ...
        ids = self._sp.encode(parts[0]) if parts[0] else []
        for special, piece in zip(parts[1::2], parts[2::2]):
            ids.append(self._special_ids[special])
            ids += self._word_start(piece)
        return ids

    def _word_start(self, text: str) -> "list[int]":
        if not text:
            return []
        if text[0] not in " ▁":
            return self._sp.encode(text)            # sentencepiece's dummy prefix is the word's ▁
        if len(text) == 1:
            return [self._sp.piece_to_id("▁")]
        return self._sp.encode(text[1:])            # the dummy prefix stands for the leading space

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

    def _render(self, messages, add_generation_prompt: bool, continue_final_message: bool) -> str:
        # the renderer transformers' apply_chat_template calls, with the same special-token names
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt,
                                            continue_final_message=continue_final_message, **self._special_texts)
        return rendered[0]


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
        self.model_dir = model_dir
        template = tok.chat_template                # transformers read it from the same files
        self.chat_template = template.get("default") if isinstance(template, dict) else template

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = False) -> "list[int]":
        """transformers parses special-token text in every text: parse_special changes nothing."""
        _check_text(text)
        ids = self._tok.encode(text, add_special_tokens=False)
        return [self.bos_token_id, *ids] if add_bos and self._adds_bos else ids

    def decode(self, ids: "list[int]") -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self._tok.convert_ids_to_tokens(int(token_id))

    def _render(self, messages, add_generation_prompt: bool, continue_final_message: bool) -> str:
        return self._tok.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)


def optional_tokenizer(model_dir: "str | Path") -> "Tokenizer | None":
    """load_tokenizer, or None (with a warning) for a checkpoint without a usable tokenizer: its
    engine takes token ids only."""
    try:
        return load_tokenizer(model_dir)
    except TokenizerError as err:     # token-id prompts still work; text prompts get a clear error
        logging.getLogger("moegen").warning("%s; the engine takes token ids only", err)
        return None


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


def _check_text(text, where: str = "text") -> None:
    if not isinstance(text, str):
        raise InputError(f"expected text as str, got {type(text).__name__}")
    check_unicode(text, where)


def check_unicode(text: str, where: str = "text") -> None:
    """Text must be encodable as UTF-8: a lone surrogate ("\\ud83d", half of an emoji's UTF-16
    pair, which JSON escapes allow) is not a character, and the tokenizers' native code fails on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: holds a lone surrogate {text[e.start]!r} at character {e.start}, which is not "
                         "valid Unicode (half of a UTF-16 pair; write the whole character, e.g. \\ud83d\\ude00)") from None


def check_messages(messages, where: str = "conversation") -> None:
    """A conversation is a non-empty list of {"role": str, "content": str} messages (other keys
    pass through to the template); an InputError naming `where` and the message otherwise."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError(f"{where}: a conversation must be a non-empty list of messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: message {j} must be an object with string 'role' and 'content'")
        check_unicode(m["content"], f"{where}: message {j}")


def read_chat_template(model_dir: Path) -> "str | None":
    """The checkpoint's default chat template, found as transformers finds it: chat_template.jinja,
    else tokenizer_config.json's `chat_template` (a string, or a list of named ones: "default")."""
    path = model_dir / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) else None


def _special_texts(model_dir: Path, ids: dict, id_to_piece) -> dict:
    """bos_token, eos_token, ... as a template sees them: tokenizer_config.json's, else the model's pieces."""
    config = _read_json(model_dir / "tokenizer_config.json")
    texts = {name: id_to_piece(i) for name, i in ids.items() if i is not None and i >= 0}
    for name in _SPECIAL_NAMES:
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            texts[name] = token
    return texts


def _special_ids(model_dir: Path, token_to_id, bos, eos: "list[int]"):
    """BOS id and EOS ids: the first of generation_config.json, config.json, tokenizer_config.json
    that names them wins, over the tokenizer's own defaults `bos`/`eos`. generation_config comes
    first because it is what the model's authors set generation to stop on (may be a list)."""
    found = {}
    for data in (_generation_config(model_dir), _read_json(model_dir / "config.json")):
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


def _generation_config(model_dir: Path) -> dict:
    """generation_config.json's fields (moegen.generation_config), {} when there are none."""
    try:
        data = read_generation_config(model_dir)
    except InputError as e:
        raise TokenizerError(str(e)) from e
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: unreadable JSON: {e}") from e
    return data if isinstance(data, dict) else {}
