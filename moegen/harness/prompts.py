"""Prompts from JSONL rows, with one set of rules for `moegen generate`, the flows and workloads."""
from pathlib import Path

from moegen.errors import InputError
from moegen.jsonl import numbered_jsonl


def read_prompts(path: Path, field: str | None, template: str | None, limit: int | None) -> list:
    """Prompts from JSONL rows: `prompt` (text), `prompt_token_ids`, or `--prompt-field`/`--template`."""
    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    prompts = [prompt_of(row, f"{path}:{lineno}", field, template) for lineno, row in numbered_jsonl(path, limit)]
    if not prompts:
        raise InputError(f"{path} holds no prompts")
    return prompts


def prompt_of(row: dict, where: str, field: str | None, template: str | None):
    if template:
        try:
            return template.format(**row)
        except KeyError as e:
            raise InputError(f"{where}: template needs field {e} which the row lacks") from None
    if field:
        if not isinstance(row.get(field), str):
            raise InputError(f"{where}: field {field!r} is missing or not a string")
        return row[field]
    if "prompt_token_ids" in row:
        ids = row["prompt_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise InputError(f"{where}: prompt_token_ids must be a list of integers")
        return ids
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    raise InputError(f"{where}: row needs a 'prompt' string or 'prompt_token_ids' list")
