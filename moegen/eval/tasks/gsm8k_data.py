"""GSM8K read from local JSONL files, for the offline lm-eval tasks in this folder.

Why a `custom_dataset` hook instead of `dataset_path: json` + `data_files`: lm-eval resolves
relative data_files against the current directory, and an absolute path cannot be written into
a YAML file that ships with the package. The task YAMLs name `!function gsm8k_data.load_gsm8k`
(or `load_gsm8k_mc`); lm-eval calls it when the task is built, and it finds the files at load
time: `$MOEGEN_GSM8K_DIR` if set, else `../shared/data/gsm8k` next to the repository.

Every row is validated first, so a bad file is an error naming the file and line, not a
KeyError deep inside lm-eval. This module is imported both as `moegen.eval.tasks.gsm8k_data`
and, by lm-eval's `!function`, straight from its file path: it imports only absolute names.
"""
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from moegen.errors import InputError
from moegen.jsonl import numbered_jsonl

ENV_VAR = "MOEGEN_GSM8K_DIR"
SPLITS = ("train", "test")
DEFAULT_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "gsm8k"
_FINAL = re.compile(r"#### (-?[0-9][0-9,]*(?:\.[0-9]+)?)\s*$")


def gsm8k_dir() -> Path:
    """Where the GSM8K files are: $MOEGEN_GSM8K_DIR, else ../shared/data/gsm8k beside the repo."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def split_path(split: str, root: "Path | None" = None) -> Path:
    path = (root or gsm8k_dir()) / f"{split}.jsonl"
    if not path.is_file():
        where = f"{ENV_VAR}={os.environ[ENV_VAR]}" if os.environ.get(ENV_VAR) else f"{ENV_VAR} unset: the default"
        raise InputError(f"GSM8K {split} file not found: {path} ({where}); set {ENV_VAR} to the "
                         f"directory holding {' and '.join(s + '.jsonl' for s in SPLITS)}")
    return path


def final_answer(answer: str) -> "str | None":
    """The number after '#### ' at the end of a worked answer, commas removed; None if absent."""
    m = _FINAL.search(answer)
    return m.group(1).replace(",", "") if m else None


def read_split(split: str, root: "Path | None" = None) -> "list[dict]":
    """Rows {question, answer} of one split, every line checked."""
    path = split_path(split, root)
    rows = [_check_row(row, f"{path}:{lineno}") for lineno, row in numbered_jsonl(path)]
    if not rows:
        raise InputError(f"{path} holds no rows")
    return rows


def _check_row(row: dict, where: str) -> dict:
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise InputError(f"{where}: field {key!r} is missing or not a non-empty string")
    if final_answer(row["answer"]) is None:
        raise InputError(f"{where}: 'answer' must end with '#### <number>', got ...{row['answer'][-40:]!r}")
    return {"question": row["question"], "answer": row["answer"]}


def check_files(root: "Path | None" = None) -> None:
    """Validate both splits (used by run_eval before lm-eval sees them)."""
    for split in SPLITS:
        read_split(split, root)


def distractors(number: str) -> "list[str]":
    """Three wrong answers derived from the true one, deterministically: +1, -1, x2, +10,
    +100 in that order, skipping any that equal the truth or an earlier pick (e.g. 0 x 2)."""
    try:
        n = Decimal(number)
    except InvalidOperation:
        raise InputError(f"not a number: {number!r}") from None
    picks = []
    for cand in (n + 1, n - 1, n * 2, n + 10, n + 100):
        text = _fmt(cand)
        if text != _fmt(n) and text not in picks:
            picks.append(text)
    return picks[:3]


def _fmt(x: Decimal) -> str:
    return str(int(x)) if x == x.to_integral_value() else format(x.normalize(), "f")


def mc_row(row: dict) -> dict:
    """A GSM8K row as a 4-way multiple choice: choices sorted numerically (so the true answer's
    position varies but is deterministic), `label` its index, `target` the true number."""
    truth = final_answer(row["answer"])
    choices = sorted([_fmt(Decimal(truth)), *distractors(truth)], key=Decimal)
    return {**row, "target": _fmt(Decimal(truth)), "choices": choices,
            "label": choices.index(_fmt(Decimal(truth)))}


def _dataset(make_row=None):
    import datasets  # imported late: lm-eval has it, the engine does not need it

    root = gsm8k_dir()
    splits = {}
    for split in SPLITS:
        rows = read_split(split, root)
        splits[split] = datasets.Dataset.from_list([make_row(r) for r in rows] if make_row else rows)
    return datasets.DatasetDict(splits)


def load_gsm8k(**_metadata):
    """custom_dataset hook of gsm8k_local: DatasetDict(train, test) of {question, answer}.
    lm-eval passes the task's metadata as keyword arguments; none are needed."""
    return _dataset()


def load_gsm8k_mc(**_metadata):
    """custom_dataset hook of gsm8k_mc_local: rows also carry `choices`, `label`, `target`."""
    return _dataset(mc_row)
