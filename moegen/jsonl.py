"""JSONL rows with their line numbers, so every error can name file:line."""
import json
from pathlib import Path

from moegen.errors import InputError


def numbered_jsonl(file: Path, n: int | None = None):
    """(line number, row) for the first n JSON-object rows of a JSONL file, blank lines skipped;
    InputError naming file:line for a row that is not a JSON object."""
    count = 0
    with Path(file).open() as f:
        for lineno, line in enumerate(f, 1):
            if n is not None and count >= n:
                return
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{file}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise InputError(f"{file}:{lineno}: each row must be a JSON object")
            count += 1
            yield lineno, row
