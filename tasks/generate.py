"""Generation in shards that survive a crash.

An output directory holds `shard-00000.jsonl`, `shard-00001.jsonl`, ... and `manifest.json`.
A shard file is written to a temporary name, flushed to disk and renamed, and only then entered
in the manifest (itself replaced atomically). So after a crash every shard in the manifest is
complete, a shard not in it is redone, and each row lives in exactly one shard file. The
manifest's fingerprint (model, prompts, sampling, shard size) refuses to mix in shards made from
other inputs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from moegen.engine.stats import tokens_per_s
from moegen.errors import InputError
from moegen.jsonl import jsonl_text, write_output
from tasks.common import stable_hash

MANIFEST = "manifest.json"
MERGED = "completions.jsonl"


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard-{index:05d}.jsonl"


def read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def plan_shards(num_rows: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(shard index, first row, end row) covering rows 0..num_rows-1."""
    return [(i, start, min(start + shard_size, num_rows)) for i, start in enumerate(range(0, num_rows, shard_size))]


def generation_fingerprint(model: str, prompts: list, sampling: dict, shard_size: int) -> str:
    return stable_hash({"model": model, "prompts": stable_hash(prompts), "sampling": sampling,
                        "shard_size": shard_size})


@task(task_run_name="open-manifest")
def open_manifest(out_dir: str, fingerprint: str, num_rows: int, shard_size: int, overwrite: bool = False) -> dict:
    """The output directory's manifest, created if absent. A manifest from other inputs is an
    error (or, with overwrite, is cleared along with its shards)."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root)
    if manifest is not None and manifest["fingerprint"] != fingerprint:
        if not overwrite:
            raise InputError(f"{root} holds shards of a different generation (other model, prompts, sampling "
                             "or shard size); choose another out_dir or pass overwrite=True")
        for path in root.glob("shard-*.jsonl"):
            path.unlink()
        manifest = None
    if manifest is None:
        manifest = {"fingerprint": fingerprint, "num_rows": num_rows, "shard_size": shard_size, "shards": {}}
        write_output(root / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def completed_shards(out_dir: str) -> set[int]:
    """Shards the manifest lists whose file is present (a listed shard whose file vanished is redone)."""
    manifest = read_manifest(Path(out_dir)) or {"shards": {}}
    return {int(i) for i in manifest["shards"] if shard_path(Path(out_dir), int(i)).is_file()}


def completion_rows(completions, start: int, extra: list[dict] | None = None) -> list[dict]:
    rows = []
    for c in completions:
        row = {**c.to_row(), "index": start + c.index}     # the shard's rows are numbered globally
        kept = {k: v for k, v in (extra[c.index] if extra else {}).items() if k not in row}
        rows.append({**row, **kept})
    return rows


def commit_shard(out_dir: Path, index: int, rows: list[dict], info: dict) -> None:
    """Write the shard file, then record it in the manifest: both steps atomic, in this order."""
    write_output(shard_path(out_dir, index), jsonl_text(rows))
    manifest = read_manifest(out_dir)
    manifest["shards"][str(index)] = info
    write_output(out_dir / MANIFEST, json.dumps(manifest, indent=1))


def sampling_for(sampling: dict, start: int, count: int) -> list:
    """Per-row SamplingParams; a seeded request keeps seed + global row index whatever the shard."""
    from moegen.engine import SamplingParams

    seed = sampling.get("seed")
    return [SamplingParams(**{**sampling, "seed": None if seed is None else seed + start + i}) for i in range(count)]


@task(cache_policy=NO_CACHE, task_run_name="generate-shard-{index}")
def generate_shard(engine, prompts: list, index: int, start: int, out_dir: str, sampling: dict,
                   passthrough: list[dict] | None = None) -> dict:
    """Generate one shard's rows and commit it; returns its manifest entry."""
    t0 = time.perf_counter()
    completions = engine.generate(prompts, sampling_for(sampling, start, len(prompts)))
    wall_s = time.perf_counter() - t0
    rows = completion_rows(completions, start, passthrough)
    generated = sum(len(r["token_ids"]) for r in rows)
    info = {"rows": len(rows), "first_row": start, "prompt_tokens": sum(len(r["prompt_token_ids"]) for r in rows),
            "generated_tokens": generated, "wall_s": round(wall_s, 4)}
    commit_shard(Path(out_dir), index, rows, info)
    get_run_logger().info("shard %d: %d rows, %d tokens, %.1f tok/s", index, len(rows), generated,
                          tokens_per_s(generated, wall_s))
    return info


def shard_summary(out_dir: str) -> dict:
    """Totals over the shards in the manifest: rows, tokens, generation time and tokens/s."""
    shards = (read_manifest(Path(out_dir)) or {"shards": {}})["shards"].values()
    generated = sum(s["generated_tokens"] for s in shards)
    wall_s = sum(s["wall_s"] for s in shards)
    return {"rows": sum(s["rows"] for s in shards), "shards": len(shards),
            "prompt_tokens": sum(s["prompt_tokens"] for s in shards), "generated_tokens": generated,
            "generate_s": round(wall_s, 3), "e2e_tokens_per_s": tokens_per_s(generated, wall_s)}


def shard_table(out_dir: str, redone: list[int]) -> list[dict]:
    """One row per shard of the manifest, marking those generated by this run."""
    shards = read_manifest(Path(out_dir))["shards"]
    return [{"shard": int(i), "rows": s["rows"], "first row": s["first_row"], "new tokens": s["generated_tokens"],
             "tok/s": round(s["generated_tokens"] / s["wall_s"], 1) if s["wall_s"] else None,
             "this run": int(i) in redone} for i, s in sorted(shards.items(), key=lambda kv: int(kv[0]))]


@task(task_run_name="merge-shards")
def merge_shards(out_dir: str, num_shards: int) -> str:
    """Concatenate the shards in order into completions.jsonl (atomically); returns its path."""
    root = Path(out_dir)
    missing = [i for i in range(num_shards) if not shard_path(root, i).is_file()]
    if missing:
        raise InputError(f"{root}: shards {missing} are missing; re-run the flow to finish them")
    text = "".join(shard_path(root, i).read_text() for i in range(num_shards))
    write_output(root / MERGED, text)
    return str(root / MERGED)
