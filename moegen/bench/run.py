"""`moegen bench`: run several systems on one workload, check they agree, compare them.

    from moegen.bench.run import run_bench
    result = run_bench("runs/fixtures/mixtral-bench", ["moegen", "hf-generate"],
                       "synthetic:prompt=128,gen=64,n=256", dtype="bfloat16")

Every system gets the very same prompt token ids and greedy settings. Each system's greedy tokens
are compared with the first system's (in float32 the exact systems must match token for token);
throughput is compared with the baseline, the first system in the list that is not moegen's
engine (and that ran). Prefill/decode time: moegen from its step timers; hf-generate split at each
batch's first logits call; hf-continuous, vllm and llama.cpp from a separate max_new_tokens=1 pass
(they mix prefill into decode steps). wall_s and e2e tokens/s are exact for every system.

JSON schema (schema 1; every number a plain JSON number, null where unknown or not finite):

    {
      "schema": 1,
      "created_at": "2026-01-01T12:00:00+00:00",
      "config": {
        "model": str, "model_kind": "checkpoint" | "config", "dummy_weights": bool,
        "systems": [str], "repeat": int, "dtype": str, "device": str,
        "usd_per_hour": float | null, "probe": "quick" | "full" | "fresh" | "off",
        "options": {system: {option: value}},
        "workload": {"spec", "name", "num_prompts", "prompt_tokens", "min_prompt_len",
                     "max_prompt_len", "max_new_tokens", "ignore_eos", "has_answers"}
      },
      "hardware": {
        "peaks": {"flops_per_s": float | null, "bw_gbps": float | null, "source": str},
        "probe": null | {"device", "quick", "cached", "measured_at", "gemm_best_flops_per_s": {dtype: float},
                         "host_mem_bw_gbps", "device_mem_bw_gbps", "h2d_pinned_gbps"},
        "cpu": {"model": str, "count": int, "torch_threads": int, "memory_bytes": int},
        "gpu": null | {"name": str, "memory_bytes": int, "cuda": str}
      },
      "versions": {"python", "torch", "transformers", "accelerate", "datasets", "moegen", "vllm"},  # null = absent
      "git": {"commit": str | null, "dirty": bool | null},   # dirty: uncommitted or untracked files
      "baseline": str | null,                   # the system ratios are taken against
      "agreement": {
        "reference": str | null,                # the first system that ran
        "exact_required": bool,                 # dtype is float32
        "ok": bool,                             # no exact system diverged where exactness is required
        "systems": {name: {"exact_expected": bool, "sequences": int, "sequences_equal": int,
                           "sequence_agreement": float, "token_agreement": float,
                           "first_divergence": null | {"prompt": int, "position": int,
                                                       "reference_token": int | null, "token": int | null}}}
      },
      "systems": [{
        "system": str, "description": str, "status": "ok" | "skipped" | "failed",
        "reason": str | null,                   # why skipped or failed
        "metrics": {                            # empty unless status is "ok"
          "prompt_tokens", "generated_tokens", "num_prompts",
          "prefill_s", "decode_s", "wall_s", "load_s",
          "prefill_tokens_per_s", "decode_tokens_per_s", "e2e_tokens_per_s",   # e2e: generated / wall
          "repeats_{e2e,prefill,decode}_tokens_per_s": [float],  # every timed pass; the median
                                                # pass by e2e tokens/s is reported
          "{prefill,decode,total}_flops", "{prefill,decode,total}_bytes",
          "{prefill,decode,total}_s_mfu", "{prefill,decode,total}_s_mbu",      # null without peaks
          "peak_flops_per_s", "peak_bw_gbps", "peaks_source",
          "usd_per_hour", "usd_per_million_tokens",                            # null without a price
          "rss_before_bytes", "peak_rss_bytes", "peak_rss_delta_bytes", "peak_device_bytes",
          "accuracy", "correct",                # null unless the workload has answers
          ...                                   # per system: moegen: experts_run, experts_skipped,
        },                                      #   weight_bytes_moved, predicted_{prefill,decode,e2e}_tokens_per_s,
                                                #   predicted_bound, prompt_tokens_computed (of prompt_tokens,
                                                #   those prefill computed: the rest reused shared KV blocks),
                                                #   prefix_hit_rate (1 - computed / prompt_tokens),
                                                #   weights_bytes (host bytes of the weights as stored),
                                                #   weight_format ("int4", "fp8", or the dtype), kv_cache_bytes
                                                #   (allocated), peak_rss_per_weights_bytes (peak_rss_bytes /
                                                #   weights_bytes), peak_rss_per_weights_kv_bytes (/ both);
                                                #   disk_bytes_read (the disk tier's reads, 0 without it)
                                                #   and with it disk_read_gbps, disk_wait_s,
                                                #   disk_bound_tokens_per_s (generated / the reads' time at
                                                #   disk_read_gbps), compute_bound_tokens_per_s (generated /
                                                #   the time not waiting on reads), bound_share (e2e / the
                                                #   smaller bound);
                                                #   hf-generate: batch_size, sweep;
                                                #   hf-continuous: setup_s
        "config": {"dtype", "device", "repeat", "warmup", "options", ...},  # what the system used; moegen
                                                #   adds engine, planned, settings {max_batch, attn_micro_batch,
                                                #   max_prefill_tokens}
        "ratios": null | {"baseline": str, name: float | null},   # name: moegen.bench.ratios.RATIO_METRICS;
                                                # this system / baseline, inverted for cost (> 1 = better)
        "outputs": [{"token_ids": [int], "text": str}]        # only with outputs=True
      }]
    }
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

from moegen.dtypes import dtype_name
from moegen.jsonl import json_safe, write_output
from moegen.errors import CheckpointError, ConfigError, DTypeError, InputError, TokenizerError
from moegen.bench.ratios import metric_ratios
from moegen.bench.systems import SYSTEMS, ConfigModel, RunResult, get_system
from moegen.bench.systems.base import skipped
from moegen.bench.systems.peaks import hardware_peaks
from moegen.bench.workloads import parse_workload

SCHEMA = 1
# Raised to the caller (the user must fix something); any other failure of a system is recorded.
USER_ERRORS = (InputError, ConfigError, DTypeError, CheckpointError, TokenizerError)


# ---- the model ---------------------------------------------------------------------------------

class VocabOnly:
    """Tokenizer stand-in for a config without a tokenizer: enough for synthetic workloads."""

    def __init__(self, config: dict):
        self.vocab_size = int(config["vocab_size"])
        self.bos_token_id = config.get("bos_token_id")

    def encode(self, text: str) -> list[int]:
        raise InputError("this model has no tokenizer (a config without one): use a synthetic workload")


def resolve_model(model, dummy_weights: bool = False):
    """(what systems load, tokenizer, kind). A checkpoint directory as it is; with dummy_weights,
    a ConfigModel (random weights of a checkpoint's config.json or of a bundled config such as
    "mixtral-8x7b") that only moegen's Engine.from_config builds; the other systems skip it."""
    path = Path(str(model)).expanduser()
    if not dummy_weights:
        if not path.is_dir():
            raise ConfigError(f"model {str(model)!r} is not a checkpoint directory (to run a bundled config with "
                              "random weights, add --dummy-weights / dummy_weights=True)")
        from moegen.tokenizer import load_tokenizer
        return path, load_tokenizer(path), "checkpoint"
    if path.is_dir():
        from moegen.tokenizer import load_tokenizer
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path / 'config.json'} is missing: dummy weights still need the model's config")
        config = json.loads((path / "config.json").read_text())
        try:
            tokenizer = load_tokenizer(path)
        except TokenizerError:       # a config-only directory: token-id workloads still work
            tokenizer = VocabOnly(config)
        return ConfigModel(str(path), config), tokenizer, "config"
    from moegen.configs import load_config
    config = load_config(str(model))
    return ConfigModel(str(model), config), VocabOnly(config), "config"


# ---- agreement and ratios -------------------------------------------------------------------------

def compare_tokens(reference: list, other: list) -> dict:
    """How far `other`'s greedy outputs agree with `reference`'s, prompt by prompt."""
    equal, prefix, longest, first = 0, 0, 0, None
    for i, (a, b) in enumerate(zip(reference, other)):
        same = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        equal += a == b
        prefix += same
        longest += max(len(a), len(b))
        if a != b and first is None:
            first = {"prompt": i, "position": same, "reference_token": a[same] if same < len(a) else None,
                     "token": b[same] if same < len(b) else None}
    n = len(reference)
    return {"sequences": n, "sequences_equal": equal, "sequence_agreement": equal / n if n else 1.0,
            "token_agreement": prefix / longest if longest else 1.0, "first_divergence": first}


def agreement(results: list[RunResult], dtype: str) -> dict:
    ran = [r for r in results if r.skipped_reason is None]
    exact_required = dtype in ("float32", "fp32")
    out = {"reference": ran[0].system if ran else None, "exact_required": exact_required, "ok": True, "systems": {}}
    for r in ran[1:]:
        exact = SYSTEMS[r.system].exact and SYSTEMS[ran[0].system].exact
        cmp = {"exact_expected": exact, **compare_tokens(ran[0].token_ids, r.token_ids)}
        out["systems"][r.system] = cmp
        if exact and exact_required and cmp["sequences_equal"] != cmp["sequences"]:
            out["ok"] = False
    return out


def baseline_of(results: list[RunResult]) -> RunResult | None:
    return next((r for r in results if r.skipped_reason is None and not SYSTEMS[r.system].is_moegen), None)


def ratios(result: RunResult, baseline: RunResult | None) -> dict | None:
    if baseline is None or result.skipped_reason is not None:
        return None
    return {"baseline": baseline.system, **metric_ratios(result.metrics, baseline.metrics)}


# ---- the environment ------------------------------------------------------------------------------

def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "datasets", "moegen", "vllm"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if out["moegen"] is None:
        import moegen
        out["moegen"] = moegen.__version__
    return out


def git_state() -> dict:
    repo = Path(__file__).resolve().parents[2]

    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if commit else None   # untracked sources count: not in the commit
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def hardware(device: str, peaks, probe_result: dict | None) -> dict:
    import torch

    from moegen.planner.probe import machine_info
    info = machine_info("cpu")
    out = {"peaks": peaks.to_dict(), "probe": None,
           "cpu": {"model": info["cpu_model"], "count": info["cpu_count"], "torch_threads": info["torch_threads"],
                   "isa": info["cpu_isa"], "memory_bytes": info["host_memory_bytes"]},
           "gpu": None}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        out["gpu"] = {"name": props.name, "memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    if probe_result is not None:
        keys = ("device", "quick", "cached", "measured_at", "gemm_best_flops_per_s", "host_mem_bw_gbps",
                "device_mem_bw_gbps", "h2d_pinned_gbps")
        out["probe"] = {k: probe_result.get(k) for k in keys}
    return out


# ---- the bench ------------------------------------------------------------------------------------

def _check_inputs(systems, options: dict, repeat: int):
    if isinstance(systems, str):
        systems = [s.strip() for s in systems.split(",") if s.strip()]
    if not systems:
        raise InputError("no systems to run; known systems: " + ", ".join(SYSTEMS))
    if len(set(systems)) != len(systems):
        raise InputError(f"a system is named twice in {systems}")
    chosen = [get_system(name) for name in systems]
    stray = sorted(set(options) - set(systems))
    if stray:
        raise InputError(f"options given for system(s) not in the run: {', '.join(stray)}")
    for system in chosen:
        system.check_options(options.get(system.name, {}))
    if not isinstance(repeat, int) or repeat < 1:
        raise InputError(f"repeat must be an integer >= 1, got {repeat!r}")
    return chosen


def _run_one(system, model_ref, workload, dtype, device, repeat, peaks, usd_per_hour, options) -> tuple[RunResult, str]:
    try:
        result = system.run(model_ref, workload, dtype, device, repeat=repeat, peaks=peaks,
                            usd_per_hour=usd_per_hour, **options)
    except USER_ERRORS:
        raise
    except Exception as e:      # one system failing (OOM, a bug in a baseline) must not lose the others
        return skipped(system.name, f"failed: {type(e).__name__}: {e}", {"options": options}), "failed"
    return result, "skipped" if result.skipped_reason else "ok"


def run_bench(model, systems, workload, repeat: int = 1, dtype: str = "bfloat16", device: str = "cpu",
              dummy_weights: bool = False, usd_per_hour: float | None = None, options: dict | None = None,
              probe: str = "quick", outputs: bool = False, progress=None) -> dict:
    """Run `systems` (names, or one comma-separated string) on `workload` (a spec string) and
    return the JSON-safe result described in this module's docstring. `options` maps a system
    name to its options; `probe` picks the peaks for S-MFU/S-MBU ("quick"/"full" probe, cached,
    or "off" for datasheet values); `progress(message)` is told when each system starts."""
    options = dict(options or {})
    dtype = dtype_name(dtype)     # "fp32" -> "float32"; DTypeError if unknown
    chosen = _check_inputs(systems, options, repeat)
    model_ref, tokenizer, kind = resolve_model(model, dummy_weights)
    wl = parse_workload(workload, tokenizer) if isinstance(workload, str) else workload
    peaks, probe_result = hardware_peaks(device, dtype, probe)
    results, statuses = [], []
    for system in chosen:
        if progress:
            progress(f"{system.name}: {wl.num_prompts} prompts x {wl.max_new_tokens} tokens")
        result, status = _run_one(system, model_ref, wl, dtype, device, repeat, peaks, usd_per_hour,
                                  options.get(system.name, {}))
        results.append(result)
        statuses.append(status)
    base = baseline_of(results)
    rows = []
    for system, result, status in zip(chosen, results, statuses):
        row = {"system": system.name, "description": system.description, "status": status,
               "reason": result.skipped_reason, "metrics": result.metrics, "config": result.config,
               "ratios": ratios(result, base)}
        if outputs:
            row["outputs"] = [{"token_ids": t, "text": x} for t, x in zip(result.token_ids, result.texts)]
        rows.append(row)
    report = {
        "schema": SCHEMA,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"model": str(model), "model_kind": kind, "dummy_weights": dummy_weights,
                   "systems": [s.name for s in chosen], "repeat": repeat, "dtype": dtype, "device": device,
                   "usd_per_hour": usd_per_hour, "probe": probe, "options": options, "workload": wl.describe()},
        "hardware": hardware(device, peaks, probe_result),
        "versions": versions(),
        "git": git_state(),
        "baseline": base.system if base else None,
        "agreement": agreement(results, dtype),
        "systems": rows,
    }
    return json_safe(report)


def write_json(path, report: dict) -> None:
    """Write atomically: a crash never leaves half a result file."""
    write_output(path, json.dumps(report, indent=1, allow_nan=False))
