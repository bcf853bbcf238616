"""The one output writer (moegen.jsonl.write_output): atomic for regular files and new paths,
in place for FIFOs and devices, through symlinks to their targets, "-" for stdout; a path that
cannot be written is refused before any work."""
import os
import stat
import threading
from pathlib import Path

import pytest

from moegen.cli import main
from moegen.errors import InputError, MachineFault
from moegen.jsonl import output_target, write_output


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp" in p.name]


def test_new_path_and_missing_parents_are_created(tmp_path):
    out = tmp_path / "a" / "b" / "out.jsonl"
    write_output(out, "x\n")
    assert out.read_text() == "x\n" and not leftovers(out.parent)


def test_regular_file_is_replaced_atomically(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    before = out.stat().st_ino
    write_output(out, "new\n")
    assert out.read_text() == "new\n"
    assert out.stat().st_ino != before          # a new file renamed over the old one, not truncated in place


def test_symlink_target_is_written_and_link_kept(tmp_path):
    target, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    target.write_text("old\n")
    link.symlink_to(target)
    write_output(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n"


def test_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write_output(fifo, "row\n")
    reader.join(timeout=10)
    assert got == ["row\n"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)   # still a FIFO: never replaced by a regular file


def test_device_is_written_in_place_and_errors_are_ours():
    write_output("/dev/null", "row\n")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    if os.path.exists("/dev/full"):
        with pytest.raises(MachineFault, match="cannot write output /dev/full: disk full"):
            write_output("/dev/full", "row\n")
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_dash_is_stdout(capsys):
    write_output("-", "a\nb\n")
    assert capsys.readouterr().out == "a\nb\n"


def under_a_file(d: Path) -> Path:
    (d / "file").write_text("")
    return d / "file" / "out.jsonl"


@pytest.mark.parametrize("make, message", [(lambda d: d, "is a directory"), (under_a_file, "cannot create files in")])
def test_unwritable_paths_are_refused_before_work(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        output_target(make(tmp_path))


def test_generate_refuses_a_directory_before_loading(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    code = main(["generate", "--model", str(tmp_path / "no-such-model"), "--input", str(src),
                 "--max-new-tokens", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is a directory" in err and "no-such-model" not in err
    assert not leftovers(tmp_path)
