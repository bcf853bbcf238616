"""A durable journal for bulk generation: a crash costs only the rows that were in flight.

Finished rows are appended to the output JSONL as they arrive (finish order), buffered, and made
durable (write, flush, fsync) every `flush_rows` rows or `flush_seconds` seconds. A sidecar
`OUT.journal.json` fingerprints what produced them: model, prompts, sampling and the engine
settings that change tokens. Opening a journal with the same fingerprint keeps its rows (a torn
last line, from a crash mid-write, is cut off), so only the missing rows are generated; a journal
of other inputs is refused, naming what differs, unless `overwrite`. `finish()` rewrites the file
in input order (atomically, by `moegen.jsonl.write_output`) or, for order="finish", leaves it.

Nothing is written before the first row is flushed, so a run that fails at once leaves an
existing output as it was. Outputs that cannot be reopened (stdout, a FIFO) get `PlainOutput`,
which keeps the rows in memory and writes them once at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from moegen.errors import InputError
from moegen.jsonl import json_safe, jsonl_text, output_target, write_output

ORDERS = ("input", "finish")
FLUSH_ROWS = 64
FLUSH_SECONDS = 10.0
TAIL_BYTES = 1 << 16           # read from a journal's end to find a torn last line


# ---- fingerprint --------------------------------------------------------------------------------

def fingerprint(model: str, rows, sampling: dict, engine: dict) -> dict:
    """What decides a generation's rows: the model (its name and config.json), every input row
    (the prompts, with any fields copied into the output), sampling and token-changing engine
    settings (dtype, context length, truncation)."""
    # as plain JSON, so that it compares equal to itself read back from the sidecar
    return json_safe({"model": model_identity(model), "prompts": rows_digest(rows), "sampling": sampling,
                      "engine": engine})


# sampling fields added after journals existed, with the value that means "as before": left out
# of a fingerprint at that value, so a journal written before them still resumes
_LATER_SAMPLING = {"n": 1, "logprobs": None, "prompt_logprobs": None}


def sampling_fingerprint(sampling: dict) -> dict:
    """The sampling part of a fingerprint: the fields of SamplingParams, less later ones at their
    as-before value."""
    return {k: v for k, v in sampling.items() if k not in _LATER_SAMPLING or v != _LATER_SAMPLING[k]}


def model_identity(model: str) -> dict:
    config = Path(model) / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    return {"name": str(model), "config_sha256": digest}


def rows_digest(rows) -> dict:
    """Count and sha256 of the rows, one sorted-key JSON line each."""
    digest, count = hashlib.sha256(), 0
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\n")
        count += 1
    return {"rows": count, "sha256": digest.hexdigest()}


def differences(old, new, prefix: str = "") -> list[str]:
    """'key: old -> new' for each leaf where two fingerprints differ (dotted keys)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {short(old)} in the journal, {short(new)} now"]


def short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:12] + "..."


# ---- journal ------------------------------------------------------------------------------------

def sidecar_path(out) -> Path:
    return Path(f"{out}.journal.json")


class Journal:
    """The output file as a journal of finished rows (see the module docstring)."""

    def __init__(self, out, fingerprint: dict, flush_rows: int = FLUSH_ROWS, flush_seconds: float = FLUSH_SECONDS,
                 overwrite: bool = False):
        if flush_rows < 1 or not flush_seconds >= 0:
            raise InputError(f"flush_rows must be >= 1 and flush_seconds >= 0, got {flush_rows}, {flush_seconds}")
        self.out, self.sidecar = Path(out), sidecar_path(out)
        self.fingerprint, self.flush_rows, self.flush_seconds = fingerprint, flush_rows, flush_seconds
        self.fresh = not self._matches(overwrite)
        self.done: set[int] = set() if self.fresh else recover_rows(self.out)
        self.resumed = len(self.done)
        self._buffer: list[str] = []
        self._file = None
        self._flushed_at = time.monotonic()

    def _matches(self, overwrite: bool) -> bool:
        """Whether the sidecar vouches for the rows in the output; an error if it is another
        generation's (with overwrite: False, so that it is started over)."""
        if not self.sidecar.is_file():
            return False                  # no journal: an existing output is not ours to resume
        saved = json.loads(self.sidecar.read_text())
        if saved == self.fingerprint:
            return True
        if overwrite:
            return False
        diffs = differences(saved, self.fingerprint)
        raise InputError(f"{self.out} is the journal of another generation ({'; '.join(diffs[:3])}); start over "
                         "with --overwrite (overwrite=True), or choose another output")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()                      # a failed run keeps every row it finished

    def append(self, row: dict) -> bool:
        """Journal a finished row; False (and nothing written) for an index already there."""
        if row["index"] in self.done:
            return False
        self.done.add(row["index"])
        self._buffer.append(json.dumps(row) + "\n")
        if len(self._buffer) >= self.flush_rows or time.monotonic() - self._flushed_at >= self.flush_seconds:
            self.flush()
        return True

    def flush(self) -> None:
        if self._buffer:
            if self._file is None:
                self._file = self._open()
            self._write("".join(self._buffer))
            self._buffer.clear()
        self._flushed_at = time.monotonic()

    def _write(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def _open(self):
        """The output for appending; a fresh journal first drops the old sidecar, then empties the
        output, then writes its own sidecar, so a crash in between never vouches for other rows."""
        if not self.fresh:
            return self.out.open("a")
        self.sidecar.unlink(missing_ok=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        file = self.out.open("w")
        write_output(self.sidecar, json.dumps(self.fingerprint, indent=1) + "\n")
        self.fresh = False
        return file

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self, order: str = "input") -> Path:
        """Close; in input order, rewrite the output sorted by index (atomically)."""
        self.close()
        if order == "input" and not self.fresh:
            write_output(self.out, "".join(line for _, line in sorted_lines(self.out)))
        return self.out


def recover_rows(out: Path) -> set[int]:
    """Indices of the rows in a journal file, after cutting off a torn last line (a crash while
    writing it: no newline, or not JSON). A bad line before the last is an error naming it."""
    if not out.is_file():
        return set()
    keep = torn_tail_start(out)
    if keep < out.stat().st_size:
        os.truncate(out, keep)
    return {index for index, _ in journal_lines(out)}


def torn_tail_start(out: Path) -> int:
    """Byte length of the file without its last line if that line is incomplete or unreadable.
    Reads only the tail: enough of it to hold the last complete line."""
    size = out.stat().st_size
    tail_bytes = min(size, TAIL_BYTES)
    with out.open("rb") as f:
        while True:
            f.seek(size - tail_bytes)
            tail = f.read()
            if tail_bytes == size or tail.count(b"\n") >= 2:
                break
            tail_bytes = min(size, tail_bytes * 4)
    end = len(tail) if tail.endswith(b"\n") else tail.rfind(b"\n") + 1
    last_start = tail.rfind(b"\n", 0, max(end - 1, 0)) + 1
    offset = size - tail_bytes
    if end and row_index(tail[last_start:end].decode(errors="replace")) is None:
        return offset + last_start
    return offset + end


def row_index(line: str) -> int | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row.get("index") if isinstance(row, dict) and isinstance(row.get("index"), int) else None


def journal_lines(out: Path):
    """(index, line) for each row of a journal file."""
    with out.open() as f:
        for lineno, line in enumerate(f, 1):
            index = row_index(line)
            if index is None:
                raise InputError(f"{out}:{lineno}: not a journal row; --overwrite (overwrite=True) starts over")
            yield index, line


def sorted_lines(out: Path) -> list[tuple[int, str]]:
    """The rows by index, each once (the journal never repeats one; this makes sure)."""
    unique = dict(reversed(list(journal_lines(out))))      # reversed: the first copy of an index wins
    return sorted(unique.items())


class PlainOutput:
    """The rows of an output that is not a regular file (stdout, a FIFO): in memory, written once
    by `finish`. Nothing to resume from."""

    resumed = 0

    def __init__(self, out):
        self.out, self.done, self._rows = out, set(), []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def append(self, row: dict) -> bool:
        if row["index"] in self.done:
            return False
        self.done.add(row["index"])
        self._rows.append(row)
        return True

    def finish(self, order: str = "input"):
        rows = self._rows if order == "finish" else sorted(self._rows, key=lambda r: r["index"])
        write_output(self.out, jsonl_text(rows))
        return self.out


def open_output(out, fingerprint: dict, flush_rows: int = FLUSH_ROWS, flush_seconds: float = FLUSH_SECONDS,
                overwrite: bool = False):
    """A Journal for a regular file or a new path; PlainOutput for stdout, a FIFO or a device."""
    target = output_target(out)
    if target is None or (target.exists() and not target.is_file()):
        return PlainOutput(out)
    return Journal(target, fingerprint, flush_rows, flush_seconds, overwrite)


# ---- feeding a journal --------------------------------------------------------------------------

@dataclass
class Tally:
    """What this run added: rows, their prompt and generated tokens, and the time it took."""
    rows: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    wall_s: float = 0.0

    def add(self, row: dict) -> None:
        self.rows += 1
        self.prompt_tokens += len(row["prompt_token_ids"])
        # n > 1: every sample's tokens (the row's own fields repeat sample 0's)
        self.generated_tokens += sum(len(s["token_ids"]) for s in row.get("samples") or [row])
        self.wall_s = time.perf_counter() - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0


def pending_indices(num_rows: int, journal) -> list[int]:
    return [i for i in range(num_rows) if i not in journal.done]


def write_completions(journal, completions, extra: list[dict] | None = None, on_row=None) -> Tally:
    """Journal each completion as its row (plus the fields of extra[index] the row lacks), in
    the order they come; on_row(tally) after each. Rows finished before an error are kept."""
    tally = Tally()
    with journal:
        for completion in completions:
            row = completion.to_row()
            row.update({k: v for k, v in (extra[row["index"]] if extra else {}).items() if k not in row})
            if journal.append(row):
                tally.add(row)
                if on_row is not None:
                    on_row(tally)
    tally.wall_s = time.perf_counter() - tally.started
    return tally
