"""Benchmark workloads: the prompts (as token ids), the generation length, and reference answers.

A workload is written as one spec string, `KIND[:ARG][,key=value...]`:

    synthetic:prompt=128,gen=64,n=512[,seed=0]      random-token prompts of one fixed length
    gsm8k[:PATH][,n=100,gen=256,split=test,template=...]
    hf:NAME_OR_PATH,field=text[,split=train,subset=...,answer=...,n=..,gen=..]   (or template=... last)

Every kind also takes `ignore_eos=0|1` (synthetic defaults to 1: random prompts have no natural
end, and fixed output lengths are what FlexGen/MoE-Lightning-style throughput runs measure).
Prompts are tokenized once here so that every system under test gets the very same ids.
`template=` must come last: it takes the rest of the spec, commas included. `\\n` and `\\t` in it
stand for a newline and a tab, so templates can be typed in a shell.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moegen.errors import InputError
from moegen.jsonl import numbered_jsonl
from moegen.eval.tasks.gsm8k_data import gsm8k_dir as default_gsm8k_dir  # $MOEGEN_GSM8K_DIR or ../shared

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
KINDS = ("synthetic", "gsm8k", "hf")
# The keys each kind accepts, with the type their value must parse as.
_KEYS = {
    "synthetic": {"prompt": int, "gen": int, "n": int, "seed": int, "ignore_eos": bool},
    "gsm8k": {"n": int, "gen": int, "split": str, "template": str, "ignore_eos": bool},
    "hf": {"n": int, "gen": int, "split": str, "subset": str, "field": str, "template": str,
           "answer": str, "ignore_eos": bool},
}
# `template=` takes the rest of the spec, so a template may hold commas and '='.
_TEMPLATE_KEY = re.compile(r",\s*template\s*=")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class PromptSet:
    """What a workload spec names, ready to run: tokenized prompts, the generation settings and
    the reference answers."""
    name: str
    prompts: list            # list[list[int]]: token ids, identical for every system
    max_new_tokens: int
    ignore_eos: bool
    answers: list | None     # per prompt, the reference final number as a string; None = no accuracy
    spec: str

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def head(self, n: int, max_new_tokens: int | None = None) -> "PromptSet":
        """The first n prompts (e.g. a warm-up run), optionally with a shorter generation."""
        return replace(self, prompts=self.prompts[:n], answers=None if self.answers is None else self.answers[:n],
                       max_new_tokens=max_new_tokens or self.max_new_tokens)

    def describe(self) -> dict:
        lens = [len(p) for p in self.prompts]
        return {"spec": self.spec, "name": self.name, "num_prompts": len(lens), "prompt_tokens": sum(lens),
                "min_prompt_len": min(lens), "max_prompt_len": max(lens), "max_new_tokens": self.max_new_tokens,
                "ignore_eos": self.ignore_eos, "has_answers": self.answers is not None}


# ---- spec parsing ----------------------------------------------------------------------------

def workload_kind(spec: str) -> str:
    """The kind a spec names ("gsm8k:PATH,n=8" -> "gsm8k"), unchecked."""
    return spec.split(",", 1)[0].split(":", 1)[0].strip()


def parse_workload(spec: str, tokenizer, default_gen: int = 64) -> PromptSet:
    """The prompts a workload spec string names (see the module docstring), tokenized with `tokenizer`
    (moegen.tokenizer.Tokenizer or anything with encode/bos_token_id/vocab_size)."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("workload spec is empty; e.g. synthetic:prompt=128,gen=64,n=512 or gsm8k,n=100")
    body, template = _split_template(spec.strip())
    head, *pairs = body.split(",")
    pairs = [p for p in pairs if p.strip()] + ([f"template={template}"] if template is not None else [])
    kind, _, arg = head.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise InputError(f"workload {spec!r}: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if kind == "synthetic" and arg:          # synthetic has no ARG: `synthetic:prompt=128,...`
        pairs, arg = [arg, *pairs], ""
    opts = _parse_pairs(spec, kind, pairs)
    gen = opts.pop("gen", default_gen)
    if gen < 1:
        raise InputError(f"workload {spec!r}: gen must be >= 1, got {gen}")
    if "n" in opts and opts["n"] < 1:
        raise InputError(f"workload {spec!r}: n must be >= 1, got {opts['n']}")
    if kind == "synthetic":
        return _synthetic(spec, tokenizer, gen, **opts)
    if kind == "gsm8k":
        return _gsm8k(spec, tokenizer, gen, arg.strip(), **opts)
    if not arg.strip():
        raise InputError(f"workload {spec!r}: hf needs a dataset name or file, e.g. hf:data.jsonl,field=text")
    return _hf(spec, tokenizer, gen, arg.strip(), **opts)


def _split_template(spec: str) -> tuple[str, str | None]:
    match = _TEMPLATE_KEY.search(spec)
    return (spec, None) if match is None else (spec[:match.start()], spec[match.end():])


def _parse_pairs(spec: str, kind: str, pairs: list[str]) -> dict:
    allowed, out = _KEYS[kind], {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise InputError(f"workload {spec!r}: {pair!r} is not key=value")
        if key not in allowed:
            raise InputError(f"workload {spec!r}: unknown key {key!r} for {kind}; known keys: {', '.join(allowed)}")
        # a template keeps its spaces ("Answer: " may end in one on purpose)
        out[key] = _convert(spec, key, value if key == "template" else value.strip(), allowed[key])
    return out


def _convert(spec: str, key: str, value: str, kind: type):
    if kind is int:
        try:
            return int(value)
        except ValueError:
            raise InputError(f"workload {spec!r}: {key}={value!r} is not an integer") from None
    if kind is bool:
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise InputError(f"workload {spec!r}: {key}={value!r} is not a boolean (use 0 or 1)")
    if not value:
        raise InputError(f"workload {spec!r}: {key} is empty")
    return value.replace("\\n", "\n").replace("\\t", "\t") if key == "template" else value


# ---- kinds -----------------------------------------------------------------------------------

def _starts_with_bos(tokenizer) -> bool:
    """Whether this tokenizer's encoded texts begin with BOS (Llama-style yes, Qwen-style no):
    synthetic prompts follow the model's own convention."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        return tokenizer.encode("a")[:1] == [bos]
    except InputError:        # a tokenizer stand-in that cannot encode text: trust bos_token_id
        return True


def _synthetic(spec, tokenizer, gen, prompt: int = 128, n: int = 512, seed: int = 0, ignore_eos: bool = True):
    if prompt < 1:
        raise InputError(f"workload {spec!r}: prompt must be >= 1, got {prompt}")
    vocab = int(tokenizer.vocab_size)
    bos = [tokenizer.bos_token_id] if _starts_with_bos(tokenizer) else []
    # ids below 3 are the special tokens of Llama-style vocabularies (unk, bos, eos): leave them out
    low = 3 if vocab > 3 else 0
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(low, vocab, (n, prompt - len(bos)), generator=g).tolist()
    return PromptSet(f"synthetic-p{prompt}-g{gen}-n{n}", [bos + row for row in body], gen, ignore_eos, None, spec)


def _gsm8k(spec, tokenizer, gen, path: str, n: int | None = None, split: str = "test",
           template: str = DEFAULT_TEMPLATE, ignore_eos: bool = False):
    where = Path(path).expanduser() if path else default_gsm8k_dir()
    file = where / f"{split}.jsonl" if where.is_dir() else where
    if not file.is_file():
        hint = "" if path else " (set MOEGEN_GSM8K_DIR or write gsm8k:PATH)"
        raise InputError(f"workload {spec!r}: GSM8K file {file} does not exist{hint}")
    rows = _read_jsonl(file, n)
    prompts, answers = [], []
    for i, row in enumerate(rows):
        where_row = f"{file} row {i}"
        prompts.append(_encode(tokenizer, _fill(template, row, where_row), where_row))
        answers.append(gsm8k_answer(_field(row, "answer", where_row), where_row))
    return PromptSet(f"gsm8k-{split}-n{len(prompts)}-g{gen}", prompts, gen, ignore_eos, answers, spec)


def _hf(spec, tokenizer, gen, name: str, n: int | None = None, split: str = "train", subset: str | None = None,
        field: str | None = None, template: str | None = None, answer: str | None = None, ignore_eos: bool = False):
    if (field is None) == (template is None):
        raise InputError(f"workload {spec!r}: give exactly one of field=COLUMN or template=...")
    rows = load_rows(name, split, subset, n)
    if not rows:
        raise InputError(f"dataset {name!r} split {split!r} has no rows")
    prompts, answers = [], [] if answer else None
    for i, row in enumerate(rows):
        where = f"{name} [{split}] row {i}"
        text = _fill(template, row, where) if template else _field(row, field, where)
        if not isinstance(text, str):
            raise InputError(f"{where}: field {field!r} is {type(text).__name__}, not text")
        prompts.append(_encode(tokenizer, text, where))
        if answer:
            answers.append(final_number(str(_field(row, answer, where))))
    label = Path(name).stem if Path(name).suffix else name.replace("/", "_")
    return PromptSet(f"hf-{label}-{split}-n{len(prompts)}-g{gen}", prompts, gen, ignore_eos, answers, spec)


def load_rows(name: str, split: str, subset: str | None, n: int | None) -> list[dict]:
    """Rows of a dataset through `datasets.load_dataset`: a local .json/.jsonl/.parquet/.csv file
    via the matching builder, a local folder, or a hub name (online users)."""
    import datasets

    path = Path(name).expanduser()
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.is_file():
        if path.suffix not in builders:
            raise InputError(f"dataset file {path}: unsupported type {path.suffix!r}; use {', '.join(builders)}")
        args, kwargs = (builders[path.suffix],), {"data_files": {split: str(path)}}
    elif path.is_dir():
        args, kwargs = (str(path),), {}
    elif name.startswith((".", "/", "~")) or path.suffix in builders:
        raise InputError(f"dataset file {path} does not exist")
    else:
        args, kwargs = (name, subset) if subset else (name,), {}
    try:
        ds = datasets.load_dataset(*args, split=split, **kwargs)
    except Exception as e:   # datasets raises many types (missing split, offline hub, bad file)
        raise InputError(f"dataset {name!r} split {split!r} could not be loaded: {type(e).__name__}: {e}") from e
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    return list(ds)


# ---- rows ------------------------------------------------------------------------------------

def _read_jsonl(file: Path, n: int | None) -> list[dict]:
    rows = [row for _, row in numbered_jsonl(file, n)]
    if not rows:
        raise InputError(f"{file} holds no rows")
    return rows


def _present(row: dict) -> dict:
    # datasets gives every row every column of the file, None where a row had none: that is missing
    return {k: v for k, v in row.items() if v is not None}


def _field(row: dict, name: str, where: str):
    row = _present(row)
    if name not in row:
        raise InputError(f"{where}: field {name!r} is missing (row has {', '.join(map(str, row)) or 'no fields'})")
    return row[name]


def _fill(template: str, row: dict, where: str) -> str:
    row = _present(row)
    try:
        return template.format(**row)
    except KeyError as e:
        raise InputError(f"{where}: template needs field {e} which the row lacks "
                         f"(row has {', '.join(map(str, row)) or 'no fields'})") from None
    except (IndexError, ValueError) as e:
        raise InputError(f"template {template!r} is not a valid format string: {e}") from None


def _encode(tokenizer, text: str, where: str) -> list[int]:
    if not text:
        raise InputError(f"{where}: the prompt is empty")
    ids = tokenizer.encode(text)
    if not ids:
        raise InputError(f"{where}: the prompt encodes to no tokens")
    return list(ids)


# ---- answers ---------------------------------------------------------------------------------

def normalize_number(text: str) -> str:
    """'1,234.50' -> '1234.5', '-3' -> '-3': one spelling per value, so answers compare as strings."""
    text = text.replace(",", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else repr(value)


def final_number(text: str) -> str | None:
    """The last number in text, normalized; None if it holds none."""
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def gsm8k_answer(answer: str, where: str = "answer") -> str:
    """The reference number of a GSM8K answer, which ends '#### N'."""
    if "####" not in str(answer):
        raise InputError(f"{where}: GSM8K answer has no '#### N' line")
    number = final_number(str(answer).rsplit("####", 1)[1])
    if number is None:
        raise InputError(f"{where}: no number after '####'")
    return number


# Generation runs for a fixed length without stop strings (every system supports that alike), so
# the model may carry on past its answer with a new question: score only the text before it.
ANSWER_CUTS = ("\n\n", "Question:")


def predicted_number(text: str) -> str | None:
    for cut in ANSWER_CUTS:
        text = text.split(cut, 1)[0]
    return final_number(text)


def accuracy(texts: list[str], answers: list[str | None]) -> dict:
    """Exact-match accuracy of the last number of each generated text against its answer."""
    if len(texts) != len(answers):
        raise InputError(f"{len(texts)} texts for {len(answers)} answers")
    correct = sum(a is not None and predicted_number(t) == a for t, a in zip(texts, answers))
    return {"accuracy": correct / len(texts) if texts else 0.0, "correct": correct, "scored": len(texts)}
