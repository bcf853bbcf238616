"""Property: whatever JSONL rows and flag values `moegen generate` gets, it either answers every
row (exit 0, rows in input order) or refuses with one line (exit 2) and leaves the output file as
it was: never a traceback, never a partial or replaced output. Also when the output is an earlier
file that is no journal (replaced only with --overwrite), when a second writer holds the output,
and when the output's folder is deleted while the run writes it (one line, exit 1)."""
import json
import shutil

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from moegen.cli import main
from moegen.generation import journal
from moegen.generation.output_lock import OutputLock

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


GOOD = {"--max-new-tokens": 2, "--temperature": 0.0, "--top-p": 1.0}


def flag_args(chosen: dict) -> list[str]:
    return [a for k, v in chosen.items() for a in ([k] if v is True else [k, str(v)])]


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(rows, min_size=0, max_size=4), chosen=flags, overwrite=st.booleans(),
       disturb=st.sampled_from([None, None, "second writer", "folder deleted"]))
# valid runs, so that each outcome is tried whatever hypothesis draws
@example(batch=[{"prompt": "hi"}, {"prompt_token_ids": [1, 5]}], chosen=GOOD, overwrite=True, disturb=None)
@example(batch=[{"prompt": "hi"}], chosen=GOOD, overwrite=False, disturb=None)
@example(batch=[{"prompt": "hi"}], chosen=GOOD, overwrite=True, disturb="second writer")
@example(batch=[{"prompt": "hi"}, {"prompt": "there"}], chosen=GOOD, overwrite=True, disturb="folder deleted")
def test_generate_answers_every_row_or_refuses_in_one_line(tiny_fixture, tmp_path_factory, capsys, monkeypatch, batch,
                                                           chosen, overwrite, disturb):
    work = tmp_path_factory.mktemp("prop")
    src, out = work / "in.jsonl", work / "sub" / "out.jsonl"
    src.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in batch))
    out.parent.mkdir()
    out.write_text("earlier output\n")
    model = tiny_fixture("mixtral")              # built (and its progress printed) before we read stderr
    capsys.readouterr()
    holder = OutputLock(out) if disturb == "second writer" else None
    if disturb == "folder deleted":             # right after the first rows reach the file
        real_write = journal.Journal._write

        def write_then_delete(self, text):
            real_write(self, text)
            shutil.rmtree(out.parent, ignore_errors=True)
        monkeypatch.setattr(journal.Journal, "_write", write_then_delete)
    try:
        code = main(["generate", "--model", str(model), "--input", str(src), "--out", str(out),
                     "--dtype", "float32", "--kv-cache-memory", "16MB", "--quiet", *flag_args(chosen),
                     *(["--overwrite"] if overwrite else [])])
    finally:
        monkeypatch.undo()
        if holder is not None:
            holder.release()
    err = capsys.readouterr().err
    event(f"{disturb or 'undisturbed'}, exit {code}")
    assert "Traceback" not in err
    if disturb == "folder deleted" and code != 2:
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert "was moved or deleted (or its folder was) while this run wrote it" in err
        return
    if code == 0:
        assert overwrite and disturb is None
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
    assert not [p.name for p in out.parent.iterdir() if ".tmp" in p.name or p.name.endswith(".lock")]
