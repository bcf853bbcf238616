"""JSONL rows with their line numbers, so every error can name file:line; the one output writer
(atomic for files, in place for FIFOs and devices); values made plain JSON."""
import contextlib
import json
import math
import os
import sys
from pathlib import Path

from moegen.errors import InputError, storage_fault


STDIN = STDOUT = "-"


def numbered_jsonl(file: Path, n: int | None = None):
    """(line number, row) for the first n JSON-object rows of a JSONL file ("-": stdin), blank
    lines skipped; InputError naming file:line for a row that is not a JSON object."""
    count, lineno = 0, 0
    with _open_input(file) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if n is not None and count >= n:
                    return
                if not line.strip():
                    continue
                count += 1
                yield lineno, _row(line, f"{file}:{lineno}")
        except UnicodeDecodeError:
            raise InputError(f"{file}:{lineno + 1}: not UTF-8 text") from None


def _row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise InputError(f"{where}: each row must be a JSON object")
    return row


def _open_input(file):
    if str(file) == STDIN:
        return contextlib.nullcontext(sys.stdin)
    try:
        return Path(file).open()
    except OSError as e:
        raise InputError(f"cannot read {file}: {e.strerror or e}") from None


def output_target(path) -> Path | None:
    """Where an output path really writes (a symlink's target), or None for standard output;
    an InputError now, before any work, when it cannot be written: a directory, or a new file
    in a directory that does not exist yet and cannot be made, or is not writable."""
    if str(path) == STDOUT:
        return None
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise InputError(f"output {path} is a directory; name a file inside it")
    if target.exists() and not target.is_file():
        if not os.access(target, os.W_OK):
            raise InputError(f"output {path} is not writable")
        return target                              # a FIFO or device: written in place
    parent = target.parent
    while not parent.exists():                     # created on write: check the nearest existing ancestor
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output {path}: cannot create files in {parent}")
    return target


def write_output(path, text: str) -> None:
    """Write `text` to an output path by the one contract every command and flow follows: a
    regular file or a new path is replaced atomically (temporary file beside it, fsync, rename:
    a crash never leaves a half-written file; parent directories are created); a symlink's target
    is what gets written; a FIFO or device is written in place, never replaced; "-" is stdout."""
    target = output_target(path)
    try:
        if target is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        elif target.exists() and not target.is_file():
            with target.open("w") as f:
                f.write(text)
        else:
            _replace_atomically(target, text)
    except OSError as e:             # disk full / I/O error: the machine's fault (exit 1); else the path's
        raise storage_fault(e, f"cannot write output {path}") from None


def _replace_atomically(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)                # only left when the write failed


def jsonl_text(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def json_safe(value):
    """Plain, strict JSON: tuples and sets as lists, numpy/torch values as numbers or lists,
    inf/nan as null (strict parsers and databases refuse them), anything else as its str()."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "tolist"):       # numpy / torch scalars and arrays
        return json_safe(value.tolist())
    return str(value)
