"""Throughput metrics, defined once for the engine, the baselines and the benchmark.

Plain metrics: tokens per second per phase, end-to-end generated tokens per second, and cost per
million tokens.

Sparse metrics after MoE-CAP (arXiv 2412.07067), with the corrections of design.md §2:
- S-MFU = FLOPs actually done / latency / peak FLOP/s. Every token is charged its top-k routed
  experts (not one), the shared experts, and attention over *its own sequence's* context, once
  (the FLOPs come from ModelSpec per sequence, so batching cannot multiply them).
- S-MBU = bytes actually read / latency / peak bandwidth. Per forward pass: the non-expert weights
  (attention, norms, routers, shared experts, dense layers, lm_head) once, the embedding rows of
  its tokens, and per MoE layer the weights of the *distinct* experts that got at least one token;
  plus, in decode, the KV cache every token reads.

The engine fills a RunRecord with what it measured; everything else comes from the ModelSpec.
"""
from __future__ import annotations

from moegen.engine.stats import PHASES, RunRecord, check_phase, tokens_per_s
from moegen.planner.model_spec import ModelSpec, expected_distinct_experts


# ---- plain ------------------------------------------------------------------------------------

def prefill_tokens_per_s(prompt_tokens: int, prefill_s: float) -> float:
    return tokens_per_s(prompt_tokens, prefill_s)


def decode_tokens_per_s(decode_tokens: int, decode_s: float) -> float:
    return tokens_per_s(decode_tokens, decode_s)


def e2e_tokens_per_s(generated_tokens: int, wall_s: float) -> float:
    """Generated tokens over the whole wall time, prefill included: the number users feel."""
    return tokens_per_s(generated_tokens, wall_s)


def usd_per_million_tokens(rate_tokens_per_s: float, usd_per_hour: float) -> float:
    """Cost of a million tokens on hardware rented (or amortised) at usd_per_hour."""
    if rate_tokens_per_s <= 0:
        return float("inf")
    return usd_per_hour / 3600.0 / rate_tokens_per_s * 1e6


def _phases(phase: str) -> tuple[str, ...]:
    return ("prefill", "decode") if check_phase(phase) == "total" else (phase,)


# ---- FLOPs and bytes actually done ------------------------------------------------------------

def run_flops(spec: ModelSpec, rec: RunRecord, phase: str = "total") -> int:
    """Matmul FLOPs the run did, per sequence over its own context (see ModelSpec)."""
    flops = 0
    for p in _phases(phase):
        if p == "prefill":
            flops += sum(spec.prefill_flops(n, c) for n, c in zip(rec.prompt_lens, rec.cached_lens()))
        else:
            flops += sum(spec.decode_steps_flops(n, g) for n, g in zip(rec.prompt_lens, rec.gen_lens))
    return flops


def _distinct_experts(spec: ModelSpec, measured: int | None, pass_tokens: tuple[int, ...]) -> float:
    """Measured sum of distinct experts over passes x MoE layers, else the uniform-routing guess."""
    if measured is not None:
        return measured
    per_layer = sum(expected_distinct_experts(spec.num_experts, spec.top_k, t) for t in pass_tokens)
    return spec.num_moe_layers * per_layer


def _phase_bytes(spec: ModelSpec, rec: RunRecord, phase: str, dtype_bytes: float, kv_dtype_bytes: float) -> dict:
    if phase == "prefill":
        passes, distinct = rec.prefill_passes(), rec.prefill_distinct_experts
        kv = 0   # prefill produces the prompt's K/V; it reads no cache
    else:
        passes, distinct = rec.decode_steps(), rec.decode_distinct_experts
        kv = sum(spec.decode_kv_read_bytes(n, g, kv_dtype_bytes) for n, g in zip(rec.prompt_lens, rec.gen_lens))
    return {"non_expert": len(passes) * spec.non_expert_bytes(dtype_bytes),
            "embedding_rows": sum(passes) * spec.hidden_size * dtype_bytes,
            "experts": _distinct_experts(spec, distinct, passes) * spec.expert_bytes(dtype_bytes),
            "kv_cache": kv}


def run_bytes(spec: ModelSpec, rec: RunRecord, phase: str = "total", dtype_bytes: float = 2,
              kv_dtype_bytes: float | None = None) -> dict[str, float]:
    """Bytes the run read, by kind (non_expert, embedding_rows, experts, kv_cache) and "total"."""
    kv_dtype_bytes = dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
    out = dict.fromkeys(("non_expert", "embedding_rows", "experts", "kv_cache"), 0.0)
    for p in _phases(phase):
        for kind, n in _phase_bytes(spec, rec, p, dtype_bytes, kv_dtype_bytes).items():
            out[kind] += n
    out["total"] = sum(out.values())
    return out


def s_mfu(spec: ModelSpec, rec: RunRecord, peak_flops: float, phase: str = "total") -> float:
    """Sparse model FLOPs utilisation; peak_flops in FLOP/s (the dense peak of the dtype run)."""
    latency_s = rec.latency_s(phase)
    if latency_s <= 0 or peak_flops <= 0:
        return 0.0
    return run_flops(spec, rec, phase) / latency_s / peak_flops


def s_mbu(spec: ModelSpec, rec: RunRecord, peak_bw_gbps: float, phase: str = "total", dtype_bytes: float = 2,
          kv_dtype_bytes: float | None = None) -> float:
    """Sparse model bandwidth utilisation; peak_bw_gbps in GB/s (1e9 bytes)."""
    latency_s = rec.latency_s(phase)
    if latency_s <= 0 or peak_bw_gbps <= 0:
        return 0.0
    read = run_bytes(spec, rec, phase, dtype_bytes, kv_dtype_bytes)["total"]
    return read / latency_s / (peak_bw_gbps * 1e9)


def throughput_report(spec: ModelSpec, rec: RunRecord, peak_flops: float | None = None,
                      peak_bw_gbps: float | None = None, dtype_bytes: float = 2,
                      kv_dtype_bytes: float | None = None, usd_per_hour: float | None = None) -> dict:
    """Every metric of one run in one flat dict (for tables and the results database)."""
    report = {"prompt_tokens": rec.prompt_tokens, "generated_tokens": rec.generated_tokens,
              "prefill_s": rec.prefill_s, "decode_s": rec.decode_s, "wall_s": rec.total_s,
              "prefill_tokens_per_s": prefill_tokens_per_s(rec.prompt_tokens, rec.prefill_s),
              "decode_tokens_per_s": decode_tokens_per_s(rec.decode_tokens, rec.decode_s),
              "e2e_tokens_per_s": e2e_tokens_per_s(rec.generated_tokens, rec.total_s)}
    for phase in PHASES:
        report[f"{phase}_flops"] = run_flops(spec, rec, phase)
        report[f"{phase}_bytes"] = run_bytes(spec, rec, phase, dtype_bytes, kv_dtype_bytes)["total"]
        if peak_flops:
            report[f"{phase}_s_mfu"] = s_mfu(spec, rec, peak_flops, phase)
        if peak_bw_gbps:
            report[f"{phase}_s_mbu"] = s_mbu(spec, rec, peak_bw_gbps, phase, dtype_bytes, kv_dtype_bytes)
    if usd_per_hour is not None:
        report["usd_per_million_tokens"] = usd_per_million_tokens(report["e2e_tokens_per_s"], usd_per_hour)
    return report
