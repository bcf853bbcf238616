"""Shared pytest fixtures."""
import os
from pathlib import Path

import pytest

from moegen.checkpoints.fixture import build_fixture

REPO = Path(__file__).resolve().parents[1]
TRAINED_ENV = "MOEGEN_TRAINED_TESTS"


def pytest_collection_modifyitems(config, items):
    """Tests marked `trained` build SmolLM2 upcycled checkpoints (~1.5 GB and tens of seconds each,
    ~30 minutes for all of them on 2 cores): they run when MOEGEN_TRAINED_TESTS=1, and are
    reported as skipped with that reason otherwise."""
    if os.environ.get(TRAINED_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"trained-weight checkpoints (SmolLM2 upcycled): set {TRAINED_ENV}=1 to run")
    for item in items:
        if "trained" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The GSM8K directory (test.jsonl, train.jsonl with `question`, `answer`), read in place:
    never copy it into the project. Override with MOEGEN_GSM8K_DIR."""
    d = Path(os.environ.get("MOEGEN_GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))
    if not (d / "test.jsonl").is_file():
        pytest.skip(f"GSM8K not found at {d} (set MOEGEN_GSM8K_DIR)")
    return d


def _tiny_factory(tmp_path_factory, fused: bool):
    built = {}

    def get(arch: str) -> Path:
        if arch not in built:
            base = tmp_path_factory.mktemp(f"tiny-{arch}{'-fused' if fused else ''}")
            built[arch] = build_fixture(arch, "tiny", seed=0, out=base / "ckpt", fused_experts=fused)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_fixture(tmp_path_factory):
    """`arch -> Path` of a tiny seed-0 fixture checkpoint, built once per arch per session."""
    return _tiny_factory(tmp_path_factory, fused=False)


@pytest.fixture(scope="session")
def tiny_fused_fixture(tmp_path_factory):
    """Like `tiny_fixture`, with experts in the fused gate_up_proj / down_proj layout."""
    return _tiny_factory(tmp_path_factory, fused=True)


@pytest.fixture(scope="session")
def mistral_chat_fixture(tiny_fixture, tmp_path_factory):
    """The tiny Mixtral with Mistral's chat template in its tokenizer_config.json."""
    from tests.chat_templates import MISTRAL, with_template
    return with_template(tiny_fixture("mixtral"), tmp_path_factory.mktemp("mistral-chat") / "ckpt", MISTRAL)


@pytest.fixture
def lm_eval_offline(monkeypatch, gsm8k_dir):
    """lm-eval and datasets offline (nothing from the hub), the GSM8K tasks reading gsm8k_dir."""
    from moegen.eval.tasks import gsm8k_data
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv(gsm8k_data.ENV_VAR, str(gsm8k_dir))


@pytest.fixture
def kill_journal_after(monkeypatch):
    """kill_journal_after(n): from now on a Journal fails ("worker died") to append once it holds n
    rows, as a run that crashes mid-way; kill_journal_after(None) mends it, for the re-run."""
    from moegen.generation.journal import Journal
    append = Journal.append

    def arrange(rows: "int | None") -> None:
        def failing(journal, row):
            if len(journal.done) == rows:
                raise RuntimeError("worker died")
            return append(journal, row)
        monkeypatch.setattr(Journal, "append", append if rows is None else failing)

    return arrange
