"""`moegen generate` end to end on a fixture, and its input errors."""
import json

import pytest

from moegen.cli import main


def run_generate(tmp_path, model, rows, *extra):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    code = main(["generate", "--model", str(model), "--input", str(src), "--out", str(out), "--max-new-tokens", "5",
                 "--dtype", "float32", "--quiet", "--kv-cache-memory", "16MB", *extra])
    return code, out


def test_generate_writes_rows_in_input_order(tmp_path, tiny_fixture, capsys):
    code, out = run_generate(tmp_path, tiny_fixture("mixtral"),
                             [{"prompt": "Janet has ducks."}, {"prompt_token_ids": [1, 415, 2936]}, {"prompt": "Hi"}],
                             "--ignore-eos")
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[1]["prompt_token_ids"] == [1, 415, 2936]
    assert all(len(r["token_ids"]) == 5 and r["finish_reason"] == "length" and isinstance(r["text"], str) for r in rows)
    summary = json.loads(capsys.readouterr().out)
    assert summary["generated_tokens"] == 15 and summary["e2e_tokens_per_s"] > 0


def test_generate_with_template_over_gsm8k(tmp_path, tiny_fixture, gsm8k_dir):
    out = tmp_path / "out.jsonl"
    code = main(["generate", "--model", str(tiny_fixture("qwen3_moe")), "--input", str(gsm8k_dir / "test.jsonl"),
                 "--template", "Question: {question}\nAnswer:", "--limit", "3", "--max-new-tokens", "3",
                 "--dtype", "float32", "--quiet", "--kv-cache-memory", "16MB", "--out", str(out)])
    assert code == 0 and len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize("row, message", [
    ("{broken", "in.jsonl:2: not valid JSON"),
    ({"text": "no prompt"}, "in.jsonl:2: row needs a 'prompt'"),
    ({"prompt_token_ids": ["a"]}, "in.jsonl:2: prompt_token_ids must be a list of integers"),
    ({"prompt": ""}, "in.jsonl:2: the prompt is empty"),             # 1-based, as every other row error
    ({"prompt_token_ids": [1, True]}, "in.jsonl:2: prompt_token_ids must be a list of integers"),  # JSON true is no id
    (b"\xff\xfe\x00".decode("latin-1"), "in.jsonl:2: not"),
])
def test_bad_rows_are_named(tmp_path, tiny_fixture, capsys, row, message):
    code, out = run_generate(tmp_path, tiny_fixture("mixtral"), [{"prompt": "ok"}, row])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()                       # nothing half-written


def test_a_sequence_beyond_the_kv_budget_is_one_line_naming_the_flag(tmp_path, tiny_fixture, capsys):
    code, out = run_generate(tmp_path, tiny_fixture("mixtral"), [{"prompt_token_ids": [1, 2, 3]}],
                             "--kv-cache-memory", "8KB", "--max-new-tokens", "20", "--ignore-eos")   # one block: 16 tokens
    err = capsys.readouterr().err
    assert code == 2 and "needs 23 tokens of KV cache" in err and "--kv-cache-memory" in err
    assert "Traceback" not in err and not out.exists()
