"""The durable journal of `moegen generate`: after kill -9 at any point (between rows, during an
fsync, in the middle of a line) a re-run yields every row exactly once, token-identical to an
uninterrupted run, recomputing only the rows that were not yet on disk; a torn last line is cut off
and regenerated; a journal of other inputs is refused unless --overwrite; --order finish."""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moegen.cli import main
from moegen.errors import InputError
from moegen.generation.fingerprint import differences
from moegen.generation.journal import Journal, PlainOutput, open_output, recover_rows, sidecar_path

REPO = Path(__file__).resolve().parents[2]
N = 12

# A child `moegen generate` that can be made to stall, so that the parent kills it exactly there:
# "fsync" stalls inside the nth os.fsync, "torn" after writing half of the nth journal write.
CHILD = r"""
import os, sys, time
from moegen.generation import journal
mode, marker, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = [0]

def stall():
    open(marker, "w").close()
    time.sleep(600)

if mode == "fsync":
    real_fsync = os.fsync
    def fsync(fd):
        calls[0] += 1
        if calls[0] == nth:
            stall()
        real_fsync(fd)
    os.fsync = fsync
elif mode == "torn":
    real_write = journal.Journal._write
    def write(self, text):
        calls[0] += 1
        if calls[0] == nth:
            self._file.write(text[:len(text) // 2])
            self._file.flush()
            stall()
        real_write(self, text)
    journal.Journal._write = write
elif mode == "rows":
    # rows land slower than the parent polls (10 ms), so its kill comes between two rows, never
    # after the last (on an idle machine the tiny model could write all of them in one poll)
    real_write = journal.Journal._write
    def write(self, text):
        real_write(self, text)
        time.sleep(0.2)
    journal.Journal._write = write
from moegen.cli import main
sys.exit(main(sys.argv[4:]))
"""


def prompts_file(path: Path, n: int = N) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?" + " Think." * (i % 4)}) + "\n"
                            for i in range(n)))
    return path


def generate_args(model, src: Path, out: Path, *extra) -> list[str]:
    return ["generate", "--model", str(model), "--input", str(src), "--out", str(out), "--max-new-tokens", "6",
            "--ignore-eos", "--dtype", "float32", "--kv-cache-memory", "16MB", "--max-batch", "2", "--quiet", *extra]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def complete_rows(path: Path) -> int:
    """Rows a re-run finds in the journal: its complete, readable lines (a torn one is cut off)."""
    return len(recover_rows(path)) if path.exists() else 0


def run(args, capsys) -> dict:
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def reference(tiny_fixture, tmp_path_factory):
    """An uninterrupted run's rows, and the model and prompts it used."""
    work = tmp_path_factory.mktemp("reference")
    model, src = tiny_fixture("mixtral"), prompts_file(work / "in.jsonl")
    assert main(generate_args(model, src, work / "out.jsonl")) == 0
    return {"rows": rows_of(work / "out.jsonl"), "model": model, "src": src}


def kill_when(proc, ready, what: str) -> None:
    deadline = time.monotonic() + 120
    try:
        while not ready():
            assert proc.poll() is None, f"the generate subprocess ended before {what}"
            assert time.monotonic() < deadline, f"no {what} in 120 s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


# ---- kill -9, then resume -------------------------------------------------------------------------

KILL_POINTS = [("rows", k) for k in sorted(random.Random(13).sample(range(1, N - 2), 2))] + \
              [("fsync", 3), ("torn", 3)]


@pytest.mark.slow
@pytest.mark.parametrize("mode, point", KILL_POINTS)
def test_killed_then_rerun_has_every_row_once_as_uninterrupted(reference, tmp_path, capsys, mode, point):
    out, marker = tmp_path / "out.jsonl", tmp_path / "stalled"
    args = generate_args(reference["model"], reference["src"], out, "--flush-rows", "1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(marker), str(point), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if mode == "rows":
        kill_when(proc, lambda: out.exists() and out.read_text().count("\n") >= point, f"{point} rows")
    else:
        kill_when(proc, marker.exists, f"a stall in {mode}")
    if mode == "torn":
        assert not out.read_text().endswith("\n")   # the kill left half a line, for the re-run to cut off
    on_disk = complete_rows(out)
    assert 1 <= on_disk < N, f"{on_disk} rows on disk at the kill"

    summary = run(args, capsys)
    assert summary["resumed_rows"] == on_disk and summary["generated_rows"] == N - on_disk   # only those not on disk
    assert rows_of(out) == reference["rows"]                                            # once each, same tokens


def test_a_torn_last_line_is_dropped_and_regenerated(reference, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = generate_args(reference["model"], reference["src"], out)
    run(args, capsys)
    out.write_text("".join(json.dumps(r) + "\n" for r in reference["rows"][:5]) +
                   json.dumps(reference["rows"][5])[:40])                  # as if it crashed writing row 5
    summary = run(args, capsys)
    assert summary["resumed_rows"] == 5 and summary["generated_rows"] == N - 5
    assert rows_of(out) == reference["rows"]


def test_a_journal_of_other_sampling_is_refused_unless_overwrite(reference, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = generate_args(reference["model"], reference["src"], out)
    run(args, capsys)
    assert main(args + ["--temperature", "0.7", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "journal of another generation" in err and "sampling.temperature: 0.0 in the journal, 0.7 now" in err
    assert rows_of(out) == reference["rows"]                               # untouched
    summary = run(args + ["--temperature", "0.7", "--seed", "1", "--overwrite"], capsys)
    assert summary["resumed_rows"] == 0 and summary["generated_rows"] == N
    assert run(args + ["--temperature", "0.7", "--seed", "1"], capsys)["generated_rows"] == 0   # now it is ours


def test_finish_order_keeps_rows_as_they_finished(reference, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    run(generate_args(reference["model"], reference["src"], out, "--order", "finish"), capsys)
    rows = rows_of(out)
    assert [r["index"] for r in rows] != list(range(N))                    # longest prompts are admitted first
    assert sorted(rows, key=lambda r: r["index"]) == reference["rows"]


# ---- the journal itself ---------------------------------------------------------------------------

def test_rows_become_durable_every_n_rows_and_a_failure_keeps_them(tmp_path):
    out = tmp_path / "out.jsonl"
    journal = Journal(out, {"f": 1}, flush_rows=2, flush_seconds=3600)
    journal.append({"index": 3, "token_ids": []})
    assert not out.exists()                                                # buffered: nothing written yet
    journal.append({"index": 1, "token_ids": []})
    assert [r["index"] for r in rows_of(out)] == [3, 1]
    assert journal.append({"index": 3, "token_ids": []}) is False          # never twice
    with pytest.raises(RuntimeError), journal:
        journal.append({"index": 0, "token_ids": []})
        raise RuntimeError("the engine failed")
    assert Journal(out, {"f": 1}).done == {0, 1, 3}
    assert Journal(out, {"f": 1}).finish() == out and [r["index"] for r in rows_of(out)] == [0, 1, 3]


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"index": 0}\nnot json\n{"index": 2}\n')
    sidecar_path(out).write_text(json.dumps({"f": 1}))
    with pytest.raises(InputError, match="out.jsonl:2: not a journal row"):
        Journal(out, {"f": 1})


def test_differences_name_each_changed_setting():
    old = {"sampling": {"temperature": 0.0, "top_p": 1.0}, "engine": {"dtype": "float32"}}
    new = {"sampling": {"temperature": 0.0, "top_p": 0.9}, "engine": {"dtype": "bfloat16"}}
    assert differences(old, new) == ['engine.dtype: "float32" in the journal, "bfloat16" now',
                                     "sampling.top_p: 1.0 in the journal, 0.9 now"]


def test_stdout_and_fifos_are_written_once_without_a_journal(tmp_path):
    assert isinstance(open_output("-", {}), PlainOutput)
    assert isinstance(open_output(tmp_path / "new.jsonl", {}), Journal)


def test_a_tally_counts_every_sample_of_an_n_row():
    from moegen.generation.job import Tally
    tally = Tally()
    tally.add({"prompt_token_ids": [1, 2, 3], "token_ids": [4, 5]})
    tally.add({"prompt_token_ids": [1, 2], "token_ids": [6], "samples": [{"token_ids": [6]}, {"token_ids": [7, 8, 9]}]})
    assert (tally.rows, tally.prompt_tokens, tally.generated_tokens) == (2, 5, 6)


def test_sampling_fields_added_later_leave_old_fingerprints_alone():
    from dataclasses import asdict

    from moegen.engine.params import SamplingParams
    from moegen.generation.fingerprint import sampling_fingerprint
    plain = sampling_fingerprint(asdict(SamplingParams(max_new_tokens=8)))
    assert not {"n", "logprobs", "prompt_logprobs"} & set(plain)
    assert sampling_fingerprint(asdict(SamplingParams(max_new_tokens=8, n=4, logprobs=0)))["n"] == 4
    assert sampling_fingerprint(asdict(SamplingParams(max_new_tokens=8, logprobs=0)))["logprobs"] == 0
