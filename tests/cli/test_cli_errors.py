"""A user's mistake on `moegen generate` is one line naming the flag, file or row, exit 2, no
traceback, and no output file."""
import io
import json
import sys

import pytest

from moegen.cli import main


def generate(tmp_path, *extra, rows=({"prompt": "hi"},), model="no-such-model"):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["generate", "--model", str(model), "--input", str(src), "--out", str(out),
                 "--max-new-tokens", "2", "--quiet", *extra])
    return code, out


@pytest.mark.parametrize("extra, message", [
    (["--template", "{prompt"], "--template '{prompt' is not a valid format string"),
    (["--template", "Q: {}"], "name each field"),
])
def test_flag_errors_before_any_work(tmp_path, capsys, extra, message):
    code, out = generate(tmp_path, *extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_stdin_input(tmp_path, tiny_fixture, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"prompt": "Hello"}\n{"prompt_token_ids": [1, 2]}\n'))
    out = tmp_path / "out.jsonl"
    code = main(["generate", "--model", str(tiny_fixture("mixtral")), "--input", "-", "--out", str(out),
                 "--max-new-tokens", "2", "--quiet", "--dtype", "float32", "--kv-cache-memory", "16MB", "--ignore-eos"])
    assert code == 0, capsys.readouterr().err
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1]


def test_stdin_row_errors_name_the_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"prompt": "ok"}\n{"prompt": ""}\n'))
    code = main(["generate", "--model", "m", "--input", "-", "--out", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "2"])
    assert code == 2 and "-:2: the prompt is empty" in capsys.readouterr().err


def has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--attn-micro-batch", "-1"], "attn_micro_batch must be >= 0"),
    (["--host-memory", "0"], "host_memory must be a positive size"),
    (["--host-memory", "1000TB"], "more than this machine has"),
    (["--host-memory", "1KB", "--dtype", "float32"], "--host-memory"),
    pytest.param(["--device", "cuda"], "no CUDA device", marks=pytest.mark.skipif(has_cuda(), reason="CUDA here")),
    (["--device", "tpu"], "device must be cpu or cuda"),
])
def test_engine_setting_errors(tmp_path, tiny_fixture, capsys, extra, message):
    code, out = generate(tmp_path, *extra, model=tiny_fixture("mixtral"))
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    from moegen.errors import InputError
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": ""}\n')
    with pytest.raises(InputError, match="the prompt is empty"):
        main(["--debug", "generate", "--model", "m", "--input", str(src), "--out", str(tmp_path / "o.jsonl"),
              "--max-new-tokens", "2"])
