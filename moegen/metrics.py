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

from dataclasses import dataclass

from moegen.planner.model_spec import ModelSpec

PHASES = ("prefill", "decode", "total")


# ---- plain ------------------------------------------------------------------------------------

def tokens_per_s(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def prefill_tokens_per_s(prompt_tokens: int, prefill_s: float) -> float:
    return tokens_per_s(prompt_tokens, prefill_s)


def decode_tokens_per_s(decode_tokens: int, decode_s: float) -> float:
    return tokens_per_s(decode_tokens, decode_s)


def lockstep_steps(gen_lens) -> list[int]:
    """Useful sequences per decode step of a lockstep batch: step j serves the sequences that
    still need a token (each sequence's first new token comes from prefill)."""
    return [sum(g - 1 > j for g in gen_lens) for j in range(max((g - 1 for g in gen_lens), default=0))]


def e2e_tokens_per_s(generated_tokens: int, wall_s: float) -> float:
    """Generated tokens over the whole wall time, prefill included: the number users feel."""
    return tokens_per_s(generated_tokens, wall_s)


def usd_per_million_tokens(rate_tokens_per_s: float, usd_per_hour: float) -> float:
    """Cost of a million tokens on hardware rented (or amortised) at usd_per_hour."""
    if rate_tokens_per_s <= 0:
        return float("inf")
    return usd_per_hour / 3600.0 / rate_tokens_per_s * 1e6


def expected_distinct_experts(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected number of experts of one layer that get >= 1 of `tokens` tokens when each token
    picks top_k distinct experts uniformly: an expert is missed by one token with probability
    1 - k/E, by all of them with (1 - k/E)^T."""
    if tokens <= 0 or num_experts <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


# ---- what the engine measured -----------------------------------------------------------------

@dataclass(frozen=True)
class RunRecord:
    """One run's accounting. Sequence i has prompt_lens[i] prompt tokens and gen_lens[i] new
    tokens, the first sampled from the prefill's logits and each further one costing a decode
    step. A forward pass is either a prefill pass or a decode step.

    prefill_pass_tokens: tokens in each prefill pass; () = all prompts in one pass.
    decode_step_seqs: sequences in each decode step; () = lockstep (step j runs the sequences
        that still need a token).
    *_distinct_experts: sum over that phase's passes and over MoE layers of the number of experts
        that received >= 1 token; None = estimate with uniform routing.
    wall_s: the whole run; None = prefill_s + decode_s (phases that do not overlap).
    """
    prompt_lens: tuple[int, ...]
    gen_lens: tuple[int, ...]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    wall_s: float | None = None
    prefill_pass_tokens: tuple[int, ...] = ()
    decode_step_seqs: tuple[int, ...] = ()
    prefill_distinct_experts: int | None = None
    decode_distinct_experts: int | None = None

    def __post_init__(self):
        for name in ("prompt_lens", "gen_lens", "prefill_pass_tokens", "decode_step_seqs"):
            object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))
        if len(self.prompt_lens) != len(self.gen_lens):
            raise ValueError(f"RunRecord: {len(self.prompt_lens)} prompt_lens but {len(self.gen_lens)} gen_lens")
        if min(self.prompt_lens + self.gen_lens, default=0) < 0:
            raise ValueError("RunRecord: negative prompt or generation length")
        self._check_sum("prefill_pass_tokens", self.prompt_tokens)
        self._check_sum("decode_step_seqs", self.decode_tokens)

    def _check_sum(self, name: str, expected: int) -> None:
        got = getattr(self, name)
        if got and sum(got) != expected:
            raise ValueError(f"RunRecord: {name} sums to {sum(got)}, expected {expected}")

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lens)

    @property
    def generated_tokens(self) -> int:
        return sum(self.gen_lens)

    @property
    def decode_tokens(self) -> int:
        """Tokens fed through decode steps (each sequence's first new token comes from prefill)."""
        return sum(max(g - 1, 0) for g in self.gen_lens)

    @property
    def total_s(self) -> float:
        return self.wall_s if self.wall_s is not None else self.prefill_s + self.decode_s

    def prefill_passes(self) -> tuple[int, ...]:
        """Tokens per prefill pass."""
        if self.prefill_pass_tokens:
            return self.prefill_pass_tokens
        return (self.prompt_tokens,) if self.prompt_tokens else ()

    def decode_steps(self) -> tuple[int, ...]:
        """Sequences (= tokens) per decode step."""
        if self.decode_step_seqs:
            return self.decode_step_seqs
        return tuple(lockstep_steps(self.gen_lens))

    def latency_s(self, phase: str) -> float:
        return {"prefill": self.prefill_s, "decode": self.decode_s, "total": self.total_s}[_check_phase(phase)]


def _check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {', '.join(PHASES)}")
    return phase


def _phases(phase: str) -> tuple[str, ...]:
    return ("prefill", "decode") if _check_phase(phase) == "total" else (phase,)


# ---- FLOPs and bytes actually done ------------------------------------------------------------

def run_flops(spec: ModelSpec, rec: RunRecord, phase: str = "total") -> int:
    """Matmul FLOPs the run did, per sequence over its own context (see ModelSpec)."""
    flops = 0
    for p in _phases(phase):
        if p == "prefill":
            flops += sum(spec.prefill_flops(n) for n in rec.prompt_lens)
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
