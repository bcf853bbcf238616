"""Issue 23, cases 8, 9, 13 and 14: a lone surrogate in a prompt, a model_type that is not a string,
flow parameters checked before the flow starts (one line, exit 2), and OpenAI batch files with a
custom_id used twice. Each is one line naming what is wrong, never a traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moegen.cli import main

REPO = Path(__file__).resolve().parents[2]


def generate(model, src: Path, out: Path, *extra) -> list[str]:
    return ["generate", "--model", str(model), "--input", str(src), "--out", str(out), "--max-new-tokens", "2",
            "--quiet", *extra]


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1, err
    return lines[0]


# ---- case 8: a lone surrogate ---------------------------------------------------------------------

@pytest.mark.parametrize("row, flags, where", [
    ('{"prompt": "hi \\ud83d there"}', (), "p.jsonl:2: the prompt: holds a lone surrogate"),
    ('{"q": "\\udc00"}', ("--template", "Q: {q}"), "p.jsonl:2: the prompt: holds a lone surrogate"),
    ('{"messages": [{"role": "user", "content": "\\ud83d"}]}', ("--chat",), "message 0: holds a lone surrogate"),
])
def test_a_lone_surrogate_is_the_rows_error(tmp_path, tiny_fixture, capsys, row, flags, where):
    model = tiny_fixture("mixtral")
    if "--chat" in flags:
        config = json.loads((model / "tokenizer_config.json").read_text())
        if not config.get("chat_template"):
            chat = tmp_path / "chat"
            import shutil
            shutil.copytree(model, chat)
            (chat / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
            model = chat
    src = tmp_path / "p.jsonl"
    first = '{"messages": [{"role": "user", "content": "ok"}]}' if "--chat" in flags else '{"prompt": "ok", "q": "ok"}'
    src.write_text(first + "\n" + row + "\n")
    assert main(generate(model, src, tmp_path / "o.jsonl", *flags)) == 2
    assert where in one_error_line(capsys.readouterr().err)


def test_a_lone_surrogate_in_an_openai_batch_row_is_that_rows_error(tmp_path, tiny_fixture, capsys):
    src = tmp_path / "b.jsonl"
    src.write_text(json.dumps({"custom_id": "bad", "url": "/v1/completions", "body": {"prompt": "\ud83d"}}) + "\n" +
                   json.dumps({"custom_id": "good", "url": "/v1/completions", "body": {"prompt": "hello"}}) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(generate(tiny_fixture("mixtral"), src, out, "--format", "openai-batch")) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["response"]["status_code"] == 400 and "lone surrogate" in rows[0]["error"]["message"]
    assert rows[1]["error"] is None


# ---- case 9: a model_type that is not a string ----------------------------------------------------

@pytest.mark.parametrize("model_type", [["mixtral"], 3, None])
def test_a_model_type_that_is_not_a_string(tmp_path, tiny_fixture, capsys, model_type):
    import shutil
    ckpt = Path(shutil.copytree(tiny_fixture("mixtral"), tmp_path / "ckpt"))
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    assert main(generate(ckpt, src, tmp_path / "o.jsonl")) == 2
    assert "model_type must be a string" in one_error_line(capsys.readouterr().err)


# ---- case 14: OpenAI batch ids --------------------------------------------------------------------

def test_a_duplicate_custom_id_is_answered_with_an_error_row(tmp_path, tiny_fixture):
    rows = [{"custom_id": cid, "url": "/v1/completions", "body": {"prompt": f"hello {i}", "max_tokens": 2}}
            for i, cid in enumerate(["a", "b", "a", "c", "b"])]
    src = tmp_path / "b.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.jsonl"
    assert main(generate(tiny_fixture("mixtral"), src, out, "--format", "openai-batch")) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["custom_id"] for a in answers] == ["a", "b", "a", "c", "b"]
    assert [a["response"]["status_code"] for a in answers] == [200, 200, 400, 200, 400]
    assert "custom_id 'a' was already used at" in answers[2]["error"]["message"]
    assert "b.jsonl:1" in answers[2]["error"]["message"]


def test_chat_with_openai_batch_is_refused(tmp_path, tiny_fixture, capsys):
    src = tmp_path / "b.jsonl"
    src.write_text(json.dumps({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "hi"}}) + "\n")
    assert main(generate(tiny_fixture("mixtral"), src, tmp_path / "o.jsonl", "--format", "openai-batch",
                         "--chat")) == 2
    assert "--chat cannot be used with --format openai-batch" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o.jsonl").exists()


# ---- case 13: flow parameters, before the flow starts -----------------------------------------------

@pytest.mark.parametrize("module, params, message", [
    ("flows.eval", ["limitt=2"], "unknown parameter(s) limitt"),
    ("flows.eval", ["limit=abc"], "limit: Input should be a valid integer"),
    ("flows.generate", ["model=/missing/model"], "model '/missing/model' is neither a fixture spec"),
])
def test_flow_parameters_are_checked_before_the_flow_starts(tmp_path, module, params, message):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": "http://127.0.0.1:9/api",
           "PREFECT_HOME": str(tmp_path / "prefect")}    # no server: the run must stop before needing one
    done = subprocess.run([sys.executable, "-m", module, *params], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert message in line and line.startswith(module.split(".")[1])


# ---- case 7 beyond the journal: every output the CLI writes ----------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_disk_under_any_output_is_exit_1(tmp_path, tiny_fixture, capsys):
    src = tmp_path / "b.jsonl"
    src.write_text(json.dumps({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "hi"}}) + "\n")
    assert main(generate(tiny_fixture("mixtral"), src, "/dev/full", "--format", "openai-batch")) == 1
    assert "cannot write output /dev/full: disk full" in one_error_line(capsys.readouterr().err)


def test_a_flows_results_url_is_checked_before_the_flow_starts():
    from flows.cli import check_parameters
    from flows.generate import generate_flow
    from moegen.errors import InputError
    for url, message in [("notaurl", "not a database URL"), ("postgresql+asyncpg://u:pw@h/db", "asyncio driver"),
                         ("mysql://u:pw@h/db", "driver is not installed")]:
        with pytest.raises(InputError, match=message):
            check_parameters(generate_flow, {"results_url": url})
    check_parameters(generate_flow, {"results_url": "sqlite:////tmp/x.db"})


def test_a_failed_flow_run_exits_2_on_a_users_mistake_1_otherwise():
    from prefect.states import Failed

    from flows.cli import failure_status
    from moegen.errors import InputError, MachineFault
    assert failure_status(Failed(data=InputError("row 3 is empty"))) == 2
    assert failure_status(Failed(data=MachineFault("disk full"))) == 1
    assert failure_status(Failed(data=RuntimeError("a bug"))) == 1
