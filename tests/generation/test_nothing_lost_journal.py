"""Issue 23, cases 1-3 and 7: one writer per `moegen generate --out` (real processes), an output
folder deleted or a journal moved mid-run, outputs that are not ours (an existing plain file, the
input itself), and a disk that fills up while journaling (a real small tmpfs where the machine
lets us mount one, and a patched write everywhere)."""
import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moegen.cli import main
from moegen.errors import MachineFault, OutputBusyError
from moegen.generation.journal import Journal, OutputLostError, sidecar_path
from moegen.generation.output_lock import lock_path

REPO = Path(__file__).resolve().parents[2]
N = 8

# A real `moegen generate` that pauses before its nth flush of rows (holding the journal's lock,
# rows already on disk) until the parent creates the file `go`.
CHILD = r"""
import os, sys, time
from moegen.generation import journal
pause_at, marker, go = int(sys.argv[1]), sys.argv[2], sys.argv[3]
calls = [0]
real_flush = journal.Journal.flush

def flush(self):
    if self._buffer:
        calls[0] += 1
        if calls[0] == pause_at:
            open(marker, "w").close()
            while not os.path.exists(go):
                time.sleep(0.05)
    real_flush(self)

journal.Journal.flush = flush
from moegen.cli import main
sys.exit(main(sys.argv[4:]))
"""
CLI = "import sys; from moegen.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from moegen.checkpoints.fixture import build_fixture
    out = tmp_path_factory.mktemp("tiny") / "mixtral"
    build_fixture("mixtral", "tiny", 1, out)
    return out


def prompts_file(path: Path, n: int = N) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?"}) + "\n" for i in range(n)))
    return path


def args(model, src, out, *extra) -> list[str]:
    return ["generate", "--model", str(model), "--dtype", "float32", "--max-new-tokens", "8", "--ignore-eos",
            "--input", str(src), "--out", str(out), "--quiet", "--flush-rows", "2", *extra]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def start_paused(tmp_path, argv, pause_at=2):
    marker, go = tmp_path / "paused", tmp_path / "go"
    marker.unlink(missing_ok=True)
    go.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(pause_at), str(marker), str(go), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never reached its pause"
        time.sleep(0.05)
    return proc, go


def run_cli(argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *argv], capture_output=True, text=True, env=env(),
                          timeout=timeout)


def indices(out: Path) -> list[int]:
    return [json.loads(line)["index"] for line in out.read_text().splitlines()]


def one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    return errors[0]


# ---- case 1: two processes on one --out ------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder_then_waits_with_wait(tmp_path, model):
    src, out = prompts_file(tmp_path / "p.jsonl"), tmp_path / "c.jsonl"
    first, go = start_paused(tmp_path, args(model, src, out))
    try:
        assert lock_path(out).read_text().strip() == str(first.pid)
        second = run_cli(args(model, src, out))
        assert second.returncode == 2
        assert f"is being written by another process (pid {first.pid})" in one_line_error(second.stderr)
        # the refused writer touched nothing: the first one's rows are intact
        waiter = subprocess.Popen([sys.executable, "-c", CLI, *args(model, src, out, "--wait")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        seen = ""
        while f"waiting for pid {first.pid}" not in seen:   # blocked on the lock, not writing
            line = waiter.stderr.readline()
            assert line, waiter.communicate()
            seen += line
        assert len(indices(out)) == 2                        # the refused ones wrote nothing
        go.touch()
        assert first.wait(timeout=300) == 0, first.communicate()
        stdout, stderr = waiter.communicate(timeout=300)
    finally:
        go.touch()
        first.kill()
    assert waiter.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["resumed_rows"] == N and summary["generated_rows"] == 0   # nothing generated twice
    assert indices(out) == list(range(N))
    assert not lock_path(out).exists()                                  # released and removed at the end


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, model):
    src, out = prompts_file(tmp_path / "p.jsonl"), tmp_path / "c.jsonl"
    first, go = start_paused(tmp_path, args(model, src, out))
    first.kill()
    first.wait()
    again = run_cli(args(model, src, out))
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["resumed_rows"] == 2 and summary["generated_rows"] == N - 2
    assert indices(out) == list(range(N))


def test_a_dead_writers_child_holding_the_lock_is_waited_for_not_refused(tmp_path):
    """A writer killed while a child it forked still shares the lock's descriptor: the lock file
    names a dead PID, so the next writer waits for the child to let go instead of refusing."""
    out, ready = tmp_path / "o.jsonl", tmp_path / "ready"
    script = textwrap.dedent(f"""
        import os, sys, time
        from moegen.generation.output_lock import OutputLock
        lock = OutputLock({str(out)!r})
        if os.fork() == 0:              # the child keeps the inherited descriptor, hence the lock
            os.close(1), os.close(2)    # not the test's pipes: it waits for the writer alone
            time.sleep(4)
            os._exit(0)
        open({str(ready)!r}, "w").close()
        os._exit(0)                     # the writer dies first, as a killed one does
    """)
    writer = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=60)
    assert writer.returncode == 0 and ready.exists(), writer.stderr
    with pytest.raises(BlockingIOError):          # the child still holds it
        fd = os.open(lock_path(out), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    t0 = time.monotonic()
    journal = Journal(out, {"f": 1})              # waits for the child (~4 s), then writes
    assert 0.5 < time.monotonic() - t0 < 60
    journal.finish()


def test_in_process_journals_exclude_each_other(tmp_path):
    out = tmp_path / "o.jsonl"
    first = Journal(out, {"f": 1})
    with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
        Journal(out, {"f": 1})
    first.finish()
    Journal(out, {"f": 1}).finish()


# ---- case 2: the output (or its folder) gone mid-run ----------------------------------------------

@pytest.mark.parametrize("how", ["folder deleted", "file moved"])
def test_output_gone_mid_run_stops_at_the_next_flush(tmp_path, model, how):
    src = prompts_file(tmp_path / "p.jsonl", 16)
    out = tmp_path / "sub" / "c.jsonl"
    proc, go = start_paused(tmp_path, args(model, src, out))
    if how == "folder deleted":
        shutil.rmtree(out.parent)
    else:
        out.rename(tmp_path / "moved.jsonl")
    go.touch()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "was moved or deleted (or its folder was) while this run wrote it" in one_line_error(stderr)
    if how == "file moved":                  # put back, the same command resumes from its rows
        (tmp_path / "moved.jsonl").rename(out)
        again = run_cli(args(model, src, out))
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["resumed_rows"] == 2
        assert indices(out) == list(range(16))


def test_journal_checks_its_file_at_each_flush_and_at_finish(tmp_path):
    out = tmp_path / "d" / "o.jsonl"
    journal = Journal(out, {"f": 1}, flush_rows=1)
    journal.append({"index": 0})
    shutil.rmtree(out.parent)
    with pytest.raises(OutputLostError):
        journal.append({"index": 1})
    journal.release()
    # a journal kept from an earlier run whose file is replaced before this run's first flush
    out = tmp_path / "o.jsonl"
    j = Journal(out, {"f": 1}, flush_rows=1)
    j.append({"index": 0})
    j.finish("finish")
    resumed = Journal(out, {"f": 1}, flush_rows=1)
    out.unlink()
    out.write_text("")
    with pytest.raises(OutputLostError):
        resumed.append({"index": 1})
    resumed.release()


# ---- case 3: outputs that are not ours -------------------------------------------------------------

def test_an_existing_plain_file_is_refused_unless_overwrite(tmp_path, model, capsys):
    src, out = prompts_file(tmp_path / "p.jsonl"), tmp_path / "notes.txt"
    out.write_text("my notes\n")
    assert main(args(model, src, out)) == 2
    assert "exists and is not the journal of a generation" in capsys.readouterr().err
    assert out.read_text() == "my notes\n"
    assert main(args(model, src, out, "--overwrite")) == 0
    assert indices(out) == list(range(N))
    empty = tmp_path / "empty.jsonl"                 # an empty file (mktemp's) holds nothing to lose
    empty.write_text("")
    assert main(args(model, src, empty)) == 0


@pytest.mark.parametrize("link", [False, True])
def test_out_equal_to_input_is_refused_even_with_overwrite(tmp_path, model, capsys, link):
    src = prompts_file(tmp_path / "p.jsonl")
    before = src.read_text()
    out = src
    if link:
        out = tmp_path / "link.jsonl"
        out.symlink_to(src)
    for extra in ((), ("--overwrite",)):
        assert main(args(model, src, out, *extra)) == 2
        assert "is the input file" in capsys.readouterr().err
    assert src.read_text() == before
    assert not sidecar_path(src).exists()


def test_openai_batch_refuses_an_existing_output_and_ignored_flags(tmp_path, model, capsys):
    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "hi"}}) + "\n")
    out = tmp_path / "r.jsonl"
    out.write_text("keep\n")
    base = ["generate", "--model", str(model), "--format", "openai-batch", "--input", str(batch), "--out", str(out),
            "--max-new-tokens", "2", "--quiet"]
    assert main(base) == 2 and "exists; replace it with --overwrite" in capsys.readouterr().err
    assert main([*base, "--chat", "--overwrite"]) == 2
    assert "--chat cannot be used with --format openai-batch" in capsys.readouterr().err
    assert out.read_text() == "keep\n"


# ---- case 7: disk full while journaling ------------------------------------------------------------

def test_disk_full_at_a_flush_is_one_line_exit_1_and_the_journal_resumes(tmp_path, model, capsys, monkeypatch):
    src, out = prompts_file(tmp_path / "p.jsonl"), tmp_path / "c.jsonl"
    assert main(args(model, src, tmp_path / "ref.jsonl")) == 0
    reference = (tmp_path / "ref.jsonl").read_text()
    capsys.readouterr()
    real_write, calls = os.write, [0]

    def full(fd, data):
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(out):
            calls[0] += 1
            if calls[0] == 3:                       # the third flush: half of it lands, then ENOSPC
                real_write(fd, bytes(data)[:len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    assert main(args(model, src, out)) == 1
    err = capsys.readouterr().err
    assert "disk full" in err and "the 4 rows journaled before are kept" in err and "Traceback" not in err
    assert len(indices(out)) == 4                   # the half-written flush was cut off again
    monkeypatch.setattr(os, "write", real_write)
    assert main(args(model, src, out)) == 0
    assert json.loads(capsys.readouterr().out)["resumed_rows"] == 4
    assert out.read_text() == reference


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}); the patched write covers it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_on_a_real_tmpfs(tmp_path, model, small_tmpfs):
    src = prompts_file(tmp_path / "p.jsonl", 48)
    out = small_tmpfs / "c.jsonl"
    full = run_cli([*args(model, src, out), "--max-new-tokens", "24"])
    assert full.returncode == 1, full.stderr
    assert "disk full" in one_line_error(full.stderr)
    kept = indices(out)                              # every line whole: the journal is valid
    assert 0 < len(kept) < 48 and len(set(kept)) == len(kept)
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    again = run_cli([*args(model, src, out), "--max-new-tokens", "24"])
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["resumed_rows"] == len(kept)
    assert indices(out) == list(range(48))


def test_storage_fault_vs_user_mistake():
    from moegen.errors import InputError, storage_fault
    assert isinstance(storage_fault(OSError(errno.EIO, "I/O error"), "x"), MachineFault)
    assert isinstance(storage_fault(OSError(errno.EACCES, "Permission denied"), "x"), InputError)


# ---- case 4 for the journal: a directory rebuilt with other weights never resumes the old rows ----

def test_a_checkpoint_rebuilt_with_other_weights_is_another_generation(tmp_path, capsys):
    from moegen.checkpoints.fixture import build_fixture
    ckpt, src, out = tmp_path / "ckpt", prompts_file(tmp_path / "p.jsonl", 2), tmp_path / "c.jsonl"
    build_fixture("mixtral", "tiny", 1, ckpt)
    assert main(args(ckpt, src, out)) == 0
    build_fixture("mixtral", "tiny", 2, ckpt)                   # same config.json, other weights
    capsys.readouterr()
    assert main(args(ckpt, src, out)) == 2
    assert "model.checkpoint_sha256" in capsys.readouterr().err
    # a sidecar written before fingerprints held the checkpoint's still resumes
    assert main(args(ckpt, src, out, "--overwrite")) == 0
    saved = json.loads(sidecar_path(out).read_text())
    del saved["model"]["checkpoint_sha256"]
    sidecar_path(out).write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(args(ckpt, src, out)) == 0
    assert json.loads(capsys.readouterr().out)["resumed_rows"] == 2


def test_output_deleted_after_the_last_flush_is_reported_in_either_order(tmp_path):
    for order in ("input", "finish"):
        out = tmp_path / order / "o.jsonl"
        journal = Journal(out, {"f": 1}, flush_rows=1)
        journal.append({"index": 0})
        journal.close()
        shutil.rmtree(out.parent)
        with pytest.raises(OutputLostError):
            journal.finish(order)
        assert journal._lock.fd is None                       # released all the same
