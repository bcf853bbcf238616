"""What decides a generation's rows, as the journal's sidecar keeps it: the model (its name,
config.json and checkpoint fingerprint), every input row, sampling and the engine settings that
change tokens. A journal resumes only under the same fingerprint (moegen.generation.journal)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moegen.jsonl import json_safe


def fingerprint(model: str, rows, sampling: dict, engine: dict) -> dict:
    """What decides a generation's rows: the model (its name and config.json), every input row
    (the prompts, with any fields copied into the output), sampling and token-changing engine
    settings (dtype, context length, truncation)."""
    # as plain JSON, so that it compares equal to itself read back from the sidecar
    return json_safe({"model": model_identity(model), "prompts": rows_digest(rows), "sampling": sampling,
                      "engine": engine})


# sampling fields added after journals existed, with the value that means "as before": left out
# of a fingerprint at that value, so a journal written before them still resumes
_LATER_SAMPLING = {"n": 1, "logprobs": None, "prompt_logprobs": None}


def sampling_fingerprint(sampling: dict) -> dict:
    """The sampling part of a fingerprint: the fields of SamplingParams, less later ones at their
    as-before value."""
    return {k: v for k, v in sampling.items() if k not in _LATER_SAMPLING or v != _LATER_SAMPLING[k]}


def model_identity(model: str) -> dict:
    """The model's name, its config.json's sha256, and the checkpoint's fingerprint (weights,
    tokenizer, chat template: moegen.checkpoints.fingerprints), so that a directory rebuilt with other
    weights under the same config never resumes the rows of the old ones."""
    from moegen.checkpoints.fingerprints import checkpoint_fingerprint

    config = Path(model) / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    return {"name": str(model), "config_sha256": digest, CHECKPOINT_KEY: checkpoint_fingerprint(model)}


CHECKPOINT_KEY = "checkpoint_sha256"


def same_generation(saved, new: dict) -> bool:
    """Whether a sidecar's fingerprint is this one's. A journal written before fingerprints held the
    checkpoint's is compared without it (it still resumes)."""
    if saved == new:
        return True
    model = saved.get("model") if isinstance(saved, dict) else None
    if isinstance(model, dict) and CHECKPOINT_KEY not in model and isinstance(new.get("model"), dict):
        return saved == {**new, "model": {k: v for k, v in new["model"].items() if k != CHECKPOINT_KEY}}
    return False


def rows_digest(rows) -> dict:
    """Count and sha256 of the rows, one sorted-key JSON line each."""
    digest, count = hashlib.sha256(), 0
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\n")
        count += 1
    return {"rows": count, "sha256": digest.hexdigest()}


def differences(old, new, prefix: str = "") -> list[str]:
    """'key: old -> new' for each leaf where two fingerprints differ (dotted keys)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {short(old)} in the journal, {short(new)} now"]


def short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:12] + "..."
