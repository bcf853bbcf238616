"""Property: whatever JSONL rows and flag values `moegen generate` gets, it either answers every
row (exit 0, rows in input order) or refuses with one line (exit 2) and leaves the output file as
it was: never a traceback, never a partial or replaced output."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moegen.cli import main

token_ids = st.lists(st.one_of(st.integers(-5, 32_010), st.booleans()), min_size=0, max_size=6)
rows = st.one_of(
    st.builds(lambda s: {"prompt": s}, st.text(max_size=12)),
    st.builds(lambda ids: {"prompt_token_ids": ids}, token_ids),
    st.builds(lambda v: {"prompt": v}, st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2))),
    st.just({"text": "no prompt field"}),
    st.just("[1, 2]"),
    st.just("{not json"),
    st.just(""),
)
flags = st.fixed_dictionaries({
    "--max-new-tokens": st.integers(-1, 3),
    "--temperature": st.sampled_from([0.0, 0.7, -1.0, float("nan"), float("inf")]),
    "--top-p": st.sampled_from([1.0, 0.9, 0.0, 1.5]),
}, optional={"--limit": st.integers(1, 4), "--seed": st.integers(0, 3), "--ignore-eos": st.just(True)})


def flag_args(chosen: dict) -> list[str]:
    return [a for k, v in chosen.items() for a in ([k] if v is True else [k, str(v)])]


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(rows, min_size=0, max_size=4), chosen=flags)
def test_generate_answers_every_row_or_refuses_in_one_line(tiny_fixture, tmp_path_factory, capsys, batch, chosen):
    work = tmp_path_factory.mktemp("prop")
    src, out = work / "in.jsonl", work / "out.jsonl"
    src.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in batch))
    out.write_text("earlier output\n")
    model = tiny_fixture("mixtral")              # built (and its progress printed) before we read stderr
    capsys.readouterr()
    code = main(["generate", "--model", str(model), "--input", str(src), "--out", str(out),
                 "--dtype", "float32", "--host-memory", "16MB", "--quiet", *flag_args(chosen)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 0:
        answered = [json.loads(line) for line in out.read_text().splitlines()]
        prompts = [r for r in batch if r != ""]
        expected = min(len(prompts), chosen.get("--limit", len(prompts)))
        assert [r["index"] for r in answered] == list(range(expected))
        assert all(0 < len(r["token_ids"]) <= chosen["--max-new-tokens"] for r in answered)
    else:
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moegen generate: error: "), err
        assert out.read_text() == "earlier output\n"
    assert not [p.name for p in work.iterdir() if ".tmp" in p.name]
