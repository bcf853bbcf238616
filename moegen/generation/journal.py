"""A durable journal for bulk generation: a crash costs only the rows that were in flight.

Finished rows are appended to the output JSONL as they arrive (finish order), buffered, and made
durable (write, flush, fsync) every `flush_rows` rows or `flush_seconds` seconds. A sidecar
`OUT.journal.json` fingerprints what produced them (moegen.generation.fingerprint): model,
prompts, sampling and the engine settings that change tokens. Opening a journal with the same fingerprint keeps its rows (a torn
last line, from a crash mid-write, is cut off), so only the missing rows are generated; a journal
of other inputs is refused, naming what differs, unless `overwrite`. `finish()` rewrites the file
in input order (atomically: temporary file, fsync, rename) or, for order="finish", leaves it.

Nothing is written before the first row is flushed, so a run that fails at once leaves an
existing output as it was. Outputs that cannot be reopened (stdout, a FIFO) get `PlainOutput`,
which keeps the rows in memory and writes them once at the end.

Nothing lost, nothing wrong:
- one writer: a Journal holds an exclusive lock (moegen.generation.output_lock) from before it reads
  the journal until finish(); a second process on the same output refuses at once, naming the
  holder's PID, or waits for it with `wait`;
- an existing output that is not a journal (no sidecar) is never replaced unless `overwrite`;
- each flush checks that the path still names the file we opened (device and inode): if it was
  moved or deleted, or its folder was, the run stops at once with an error rather than generate
  into a file no one will see, and then fail at the final rename;
- a write that fails (disk full, I/O error) is cut back off the file, so the journal stays valid
  and resumable, and is reported in one line as a fault of the machine (exit status 1).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from moegen.errors import InputError, MachineFault, storage_fault
from moegen.generation.fingerprint import differences, same_generation
from moegen.generation.output_lock import OutputLock
from moegen.jsonl import jsonl_text, output_target, write_output

ORDERS = ("input", "finish")
FLUSH_ROWS = 64
FLUSH_SECONDS = 10.0
TAIL_BYTES = 1 << 16           # read from a journal's end to find a torn last line


def sidecar_path(out) -> Path:
    return Path(f"{out}.journal.json")


class OutputLostError(MachineFault):
    """The journal file was moved or deleted (or its folder was) while a run wrote it."""


def file_identity(path) -> tuple[int, int] | None:
    """(device, inode) of the file at path, None if nothing is there."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


class Journal:
    """The output file as a journal of finished rows (see the module docstring)."""

    def __init__(self, out, fingerprint: dict, flush_rows: int = FLUSH_ROWS, flush_seconds: float = FLUSH_SECONDS,
                 overwrite: bool = False, wait: bool = False):
        if flush_rows < 1 or not flush_seconds >= 0:
            raise InputError(f"flush_rows must be >= 1 and flush_seconds >= 0, got {flush_rows}, {flush_seconds}")
        self.out, self.sidecar = Path(out), sidecar_path(out)
        self.fingerprint, self.flush_rows, self.flush_seconds = fingerprint, flush_rows, flush_seconds
        self._file, self._broken = None, False
        # the lock first: nothing of the journal is read (or its torn tail cut) under another writer
        self._lock = OutputLock(self.out, wait)
        self._identity = None
        try:
            self.fresh = not self._matches(overwrite)
            self.done: set[int] = set() if self.fresh else self._guarded(lambda: recover_rows(self.out))
            # the file the kept rows are in: it must still be there, the same file, at every flush.
            # Held open from now on, so that its inode cannot be reused by a file put in its place.
            if not self.fresh and self.out.is_file():
                self._file = self._guarded(lambda: self.out.open("a"))
        except BaseException:
            self._lock.release()
            raise
        self.resumed = len(self.done)
        self._buffer: list[str] = []
        self._flushed_at = time.monotonic()

    def _matches(self, overwrite: bool) -> bool:
        """Whether the sidecar vouches for the rows in the output; an error if it is another
        generation's (with overwrite: False, so that it is started over)."""
        if not self.sidecar.is_file():
            # no journal: an existing output is not ours to resume, nor ours to replace unasked
            # (an empty file, such as mktemp makes, holds nothing to lose)
            if not overwrite and self.out.is_file() and self.out.stat().st_size > 0:
                raise InputError(f"{self.out} exists and is not the journal of a generation (no {self.sidecar.name} "
                                 "beside it); replace it with --overwrite (overwrite=True), or choose another output")
            return False
        try:
            saved = json.loads(self.sidecar.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            if overwrite:
                return False
            raise InputError(f"{self.sidecar} is not a journal fingerprint (not JSON); start over with --overwrite "
                             "(overwrite=True), or choose another output") from None
        if same_generation(saved, self.fingerprint):
            return True
        if overwrite:
            return False
        diffs = differences(saved, self.fingerprint)
        raise InputError(f"{self.out} is the journal of another generation ({'; '.join(diffs[:3])}); start over "
                         "with --overwrite (overwrite=True), or choose another output")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self.close()                  # a failed run keeps every row it finished
        except BaseException:
            self.release()
            raise
        if exc_type is not None:
            self.release()                # ... and writes no more: the next run may start

    def release(self) -> None:
        """Let another process write this output (finish() does it; so does a failed run)."""
        self._lock.release()

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
        if self._buffer and not self._broken:
            if self._file is None:
                self._file = self._guarded(self._open)
            self.check_still_ours()
            self._write("".join(self._buffer))
            self._buffer.clear()
        self._flushed_at = time.monotonic()

    def _write(self, text: str) -> None:
        """Append text and make it durable. Written to the descriptor directly (the file object's
        own buffer stays empty), so a failed write leaves nothing queued to be retried at close;
        whatever part of it reached the file is cut off again, so the journal stays valid."""
        fd = self._file.fileno()
        start = os.fstat(fd).st_size
        try:
            data = memoryview(text.encode())
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError as e:
            kept = len(self.done) - len(self._buffer)
            self._broken = True
            self._buffer.clear()
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass                      # then the torn tail is cut off when the run resumes
            raise storage_fault(e, f"cannot journal rows to {self.out}",
                                after=f"; the {kept} rows journaled before are kept: re-run the same command "
                                      "to resume") from None

    def _guarded(self, step):
        try:
            return step()
        except OSError as e:
            self._broken = True
            raise storage_fault(e, f"cannot write {self.out}") from None

    def check_still_ours(self) -> None:
        """The output path must still name the file the rows go to (module doc)."""
        if self._file is not None:
            st = os.fstat(self._file.fileno())
            expected = (st.st_dev, st.st_ino)
        else:
            expected = self._identity
        if expected is not None and file_identity(self.out) != expected:
            self._broken = True
            self._buffer.clear()
            raise OutputLostError(f"{self.out} was moved or deleted (or its folder was) while this run wrote it: "
                                  "stopped rather than generate into a file no one will see; the rows journaled "
                                  "so far went with it (moved: put it back and re-run the same command to resume)")

    def _open(self):
        """The output for appending; a fresh journal first drops the old sidecar, then empties the
        output, then writes its own sidecar, so a crash in between never vouches for other rows."""
        if not self.fresh:
            return self.out.open("a")     # a sidecar without its output: no rows were kept
        self.sidecar.unlink(missing_ok=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        file = self.out.open("w")
        replace_file(self.sidecar, [json.dumps(self.fingerprint, indent=1) + "\n"])
        self.fresh = False
        return file

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            st = os.fstat(self._file.fileno())
            self._identity = (st.st_dev, st.st_ino)
            self._file.close()
            self._file = None

    def finish(self, order: str = "input") -> Path:
        """Close; in input order, rewrite the output sorted by index (atomically); let go of the
        output's lock."""
        try:
            self.close()
            self.check_still_ours()       # rows flushed into a file since deleted are not "done"
            if order == "input" and not self.fresh:
                self._rewrite_in_order()
        finally:
            self.release()
        return self.out

    def _rewrite_in_order(self) -> None:
        """The journal's rows sorted by index, replacing it atomically (temporary file, fsync,
        rename). A failure leaves the journal as it was: re-running finishes it."""
        try:
            replace_file(self.out, (line for _, line in sorted_lines(self.out)))
        except OSError as e:
            raise storage_fault(e, f"cannot rewrite {self.out} in input order",
                                after="; the journal is intact: re-run the same command to finish it") from None


def replace_file(path: Path, chunks) -> None:
    """Replace path by the text chunks atomically: temporary file beside it, fsync, rename, and
    the folder fsynced. OSError as it comes (the caller says what it means); a failure leaves
    path as it was."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)       # only left when the write failed


def _fsync_dir(folder: Path) -> None:
    """Make a rename in folder durable (best effort: some file systems refuse a folder's fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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

    def release(self) -> None:
        pass                              # nothing locked: stdout and FIFOs have no journal

    def finish(self, order: str = "input"):
        rows = self._rows if order == "finish" else sorted(self._rows, key=lambda r: r["index"])
        write_output(self.out, jsonl_text(rows))
        return self.out


def open_output(out, fingerprint: dict, flush_rows: int = FLUSH_ROWS, flush_seconds: float = FLUSH_SECONDS,
                overwrite: bool = False, wait: bool = False):
    """A Journal for a regular file or a new path; PlainOutput for stdout, a FIFO or a device."""
    target = output_target(out)
    if target is None or (target.exists() and not target.is_file()):
        return PlainOutput(out)
    return Journal(target, fingerprint, flush_rows, flush_seconds, overwrite, wait)
