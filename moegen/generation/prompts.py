"""Prompts from JSONL rows, with one set of rules for `moegen generate`, the flows and workloads.
Every error names the row as file:line (1-based, as editors count)."""
import string
from pathlib import Path

from moegen.errors import InputError
from moegen.jsonl import STDIN, numbered_jsonl
from moegen.tokenizer import check_unicode

MESSAGES = "messages"


def read_prompts(path: Path, field: str | None, template: str | None, limit: int | None) -> list:
    """Prompts from JSONL rows ("-" reads stdin): `prompt` (text), `prompt_token_ids`, or
    `--prompt-field`/`--template`."""
    if template is not None:
        check_template(template)
    _check_input(path)
    prompts = [prompt_of(row, f"{path}:{lineno}", field, template) for lineno, row in numbered_jsonl(path, limit)]
    if not prompts:
        raise InputError(f"{path} holds no prompts")
    return prompts


def read_chat_prompts(path: Path, field: str | None, limit: int | None, tokenizer) -> list:
    """Prompt ids of the conversations in JSONL rows ("-" reads stdin): each row's `messages` (or
    `field`), a list of {"role", "content"} messages as OpenAI's chat API takes them, through the
    checkpoint's chat template with the assistant's turn opened."""
    _check_input(path)
    prompts = [tokenizer.apply_chat_template(row.get(field or MESSAGES), f"{path}:{lineno}: {field or MESSAGES!r}")
               for lineno, row in numbered_jsonl(path, limit)]
    if not prompts:
        raise InputError(f"{path} holds no conversations")
    return prompts


def _check_input(path: Path) -> None:
    if str(path) != STDIN and not Path(path).is_file():
        raise InputError(f"input file {path} does not exist")


def check_template(template: str) -> None:
    """A malformed format string ('{prompt', '{0}') is the user's error, found before any row."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise InputError(f"--template {template!r} is not a valid format string: {e}") from None
    if any(not name or name.isdigit() for name in names):
        raise InputError(f"--template {template!r}: name each field, e.g. {{question}}")


def prompt_of(row: dict, where: str, field: str | None, template: str | None):
    prompt = _prompt_of(row, where, field, template)
    if not prompt:
        raise InputError(f"{where}: the prompt is empty")
    if isinstance(prompt, str):
        check_unicode(prompt, f"{where}: the prompt")
    return prompt


def _prompt_of(row: dict, where: str, field: str | None, template: str | None):
    if template:
        try:
            return template.format(**row)
        except KeyError as e:
            raise InputError(f"{where}: template needs field {e} which the row lacks") from None
        except (ValueError, IndexError, AttributeError) as e:   # e.g. a format spec the value refuses
            raise InputError(f"{where}: template cannot format this row: {e}") from None
    if field:
        if not isinstance(row.get(field), str):
            raise InputError(f"{where}: field {field!r} is missing or not a string")
        return row[field]
    if "prompt_token_ids" in row:
        ids = row["prompt_token_ids"]
        # JSON true/false are ints to Python: refuse them rather than read true as token 1
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InputError(f"{where}: prompt_token_ids must be a list of integers")
        return ids
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    raise InputError(f"{where}: row needs a 'prompt' string or 'prompt_token_ids' list")
