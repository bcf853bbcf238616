"""JSONL rows with their line numbers, so every error can name file:line; atomic file writes."""
import json
import os
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


def write_atomic(path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync, and rename it over `path`: a crash
    never leaves a half-written file (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def jsonl_text(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)
