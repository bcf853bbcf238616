"""Roofline cost model of a moegen run, with measured hardware constants.

Per layer of a forward pass (a prefill pass over many prompts, or a decode step over the global
batch) the model charges, after MoE-Lightning's hierarchical roofline (HRM):

- pcie:      streamed weights host -> device (the layer's dense group when not resident, plus the
             *distinct* experts that received tokens and are not resident), over h2d bandwidth;
- kv:        other PCIe traffic: q/k/v out and the attention output back when decode attention runs
             on the CPU, the micro-batches' KV when it runs on the GPU over the host cache, the
             prompt's K/V written to the host cache in prefill;
- attention: attention compute on its device (decode: KV bytes / measured attention rate; prefill:
             core FLOPs / GEMM rate);
- compute / memory: each GEMM group (dense projections, each expert, lm_head) costs
             max(FLOPs / achieved rate at its row count, weight bytes / memory bandwidth), charged
             to "compute" or "memory" by whichever is larger;
- elementwise: on the CPU, the non-GEMM passes over activations (norms, RoPE, residual adds, the
             expert gather/activation/combine): their bytes over the probe's elementwise bandwidth;
- overhead:  per-op dispatch / kernel launch and per-micro-batch host<->device syncs (on a GPU
             dispatch overlaps the kernels it launched: a group costs max(kernels, dispatch)).

Time is not the plain max of the terms: it follows the engine's schedule (engine/runner.py),
whose serial parts cannot overlap:
- attention (all micro-batches), the dense projections and the router run first; a layer's experts
  are announced to the copy stream only after routing, so their copies cannot start earlier;
- then experts stream through the buffer pool while the ones already there compute: a two-stage
  pipeline, time max(copies + last compute, first copy + computes), serial when the pool leaves
  one buffer for experts (a streamed dense group holds one buffer for the whole layer);
- the next layer's dense group is copied behind this layer's experts.
On the CPU everything is resident and one device does it all: the terms add.
`ideal_decode_tokens_per_s` is the HRM bound with full overlap (max of the terms), for reference.

Routing is taken as uniform: a layer's pass over T tokens touches expected_distinct_experts(E, k, T)
experts with T*k/D rows each. GEMM rates come from the probe's per-shape rows, interpolated in the
row count M (an expert GEMM over few rows runs far below peak); where the probe measured it, the
*sustained* rate (weights streaming from memory, median pass), not the cache-warm peak. Prompt
attention on the CPU runs at the probe's measured causal-SDPA rate.

Units: *_s seconds, *_bytes bytes, *_gbps 1e9 bytes/s, *_flops_per_s FLOP/s.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from moegen.errors import ConfigError, InputError, MoegenError
from moegen.planner.model_spec import ModelSpec, expected_distinct_experts

GB = 1e9
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
               "float8_e4m3fn": 1, "fp8": 1}
_CANONICAL_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp8": "float8_e4m3fn"}
TERMS = ("pcie", "kv", "attention", "compute", "memory", "elementwise", "overhead")
ATTENTION_PLACEMENTS = ("cpu", "gpu", "split")

# Dispatch costs of eager PyTorch (Python + op launch), counted per op. Rough, not measured by the
# probe: they matter only when GEMMs are small (tiny models, small G).
CPU_OP_OVERHEAD_S = 10e-6
CUDA_OP_OVERHEAD_S = 10e-6
CUDA_SYNC_OVERHEAD_S = 30e-6   # a blocking device<->host copy round trip (CPU decode attention)
SEQ_OVERHEAD_S = 5e-6          # per sequence per step: scheduling, sampling bookkeeping, stops
# Ops per unit of work in the runner (runner.py, layers/): counted from the code, approximately.
OPS_PER_LAYER = 20             # norms, router (linear, softmax, top-k, sort, bincount), residual adds
OPS_PER_MICRO_BATCH = 15       # q/k/v/o projections, rope, cache write, attention, concat
OPS_PER_EXPERT_CHUNK = 8       # gather, gate_up, act, mul, down, weight, scatter
OPS_PER_PROMPT = 4             # prefill attends prompt by prompt (slice, SDPA, transposes)
OPS_PER_STEP = 30              # embedding, final norm, lm_head, sampling, step inputs
ACTIVATION_SLACK = 1.25        # allocator rounding and transient copies


class PlanError(MoegenError):
    """No plan fits the memory budgets, or a plan asks for something the hardware cannot do."""


def dtype_bytes_of(dtype: str) -> int:
    try:
        return DTYPE_BYTES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}") from None


def format_bytes(n: float) -> str:
    """Binary units, as parse_bytes reads them: 80.0 MiB, 1.50 GiB."""
    n = float(n)
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit in ("GiB", "TiB") else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


# ---- workload ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """num_sequences prompts of prompt_len tokens, each generating gen_len tokens (no early EOS)."""
    prompt_len: int
    gen_len: int
    num_sequences: int = 1
    dtype: str = "bfloat16"           # weights, activations and KV cache

    def __post_init__(self):
        for name in ("prompt_len", "gen_len", "num_sequences"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"workload: {name} must be >= 1, got {getattr(self, name)}")
        dtype_bytes_of(self.dtype)
        object.__setattr__(self, "dtype", _CANONICAL_DTYPE.get(self.dtype.lower(), self.dtype.lower()))

    @property
    def dtype_bytes(self) -> int:
        return dtype_bytes_of(self.dtype)

    @property
    def seq_tokens(self) -> int:
        return self.prompt_len + self.gen_len


# ---- hardware ---------------------------------------------------------------------------------

class GemmCurve:
    """Achieved FLOP/s of x[M, K] @ w[K, N] as a function of M, from measured (m, k, n, rate) rows.

    Rows are grouped by (K, N); a query uses the group nearest in log(K*N). Within a group the
    rate is made non-decreasing in M by taking, at each M, the least rate measured at M or more:
    a lone fast outlier (cache luck, a noisy neighbour on the slower ones) must not make a
    mid-sized GEMM look faster than a large one. Between points: log-log interpolation; above the
    largest M: flat; below the smallest: the time per call of the smallest (rate proportional to
    M): a GEMM's weight read and fixed costs do not shrink with its rows, and CPU bf16 kernels can
    fall to a slow path at small M (here: 7 GFLOP/s at M=8 against 230 at M=256, the same ~16 ms
    per call). Without rows: peak * M / (M + half).
    """

    def __init__(self, peak_flops_per_s: float, rows=(), half_rate_tokens: float = 0.0):
        self.peak_flops_per_s = float(peak_flops_per_s)
        self.half_rate_tokens = float(half_rate_tokens)
        groups: dict[tuple[int, int], dict[int, float]] = {}
        for m, k, n, rate in rows:
            if rate > 0:
                best = groups.setdefault((int(k), int(n)), {})
                best[int(m)] = max(best.get(int(m), 0.0), float(rate))
        self.groups = {}
        for kn, by_m in groups.items():
            ms = sorted(by_m)
            env, low = [], math.inf
            for m in reversed(ms):
                low = min(low, by_m[m])
                env.append(low)
            self.groups[kn] = list(zip(ms, reversed(env)))
        self._cache: dict[tuple, float] = {}

    @property
    def top_flops_per_s(self) -> float:
        """The best rate the curve will ever give (outliers removed), for printing."""
        if not self.groups:
            return self.peak_flops_per_s
        return max(points[-1][1] for points in self.groups.values())

    def rate(self, m: float, k: int, n: int) -> float:
        key = (round(m, 3), k, n)
        if key not in self._cache:
            self._cache[key] = self._rate(max(m, 1e-9), k, n)
        return self._cache[key]

    def _rate(self, m: float, k: int, n: int) -> float:
        if not self.groups:
            if self.half_rate_tokens > 0:
                return self.peak_flops_per_s * m / (m + self.half_rate_tokens)
            return self.peak_flops_per_s
        size = math.log(max(k * n, 1))
        points = min(self.groups.items(), key=lambda it: (abs(math.log(it[0][0] * it[0][1]) - size), -it[0][0]))[1]
        if m >= points[-1][0]:
            return points[-1][1]
        if m <= points[0][0]:   # no faster per call than the fewest rows measured
            return points[0][1] * m / points[0][0]
        for (m0, r0), (m1, r1) in zip(points, points[1:]):
            if m0 <= m <= m1:
                t = math.log(m / m0) / math.log(m1 / m0)
                return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
        return points[-1][1]   # unreachable: the loop covers [first, last]


@dataclass
class Hardware:
    """Hardware constants. `device` is where GEMMs run: "cpu" (everything in host memory, no PCIe)
    or "cuda" (weights in pinned host memory, streamed over PCIe; KV cache in host memory).

    gemm_flops_per_s: peak (best measured) GEMM rate per dtype on `device`.
    gemm_shapes: per dtype, measured (m, k, n, flops_per_s) rows; the curve interpolates over M.
    gemm_half_rate_tokens: without rows, rows at which a GEMM reaches half its peak (0 = always
        peak; small-M slowness then comes only from the memory roofline).
    cpu_attention_gbps: KV GB/s the CPU decode attention reads (the probe's cpu_attention rate).
    device_attention_gbps: the same on the GPU; 0 = device_mem_bw_gbps.
    cpu_flops_per_s: CPU GEMM rate, caps CPU attention by FLOPs (MLA's absorbed attention does
        many FLOPs per KV byte); 0 = bytes only.
    prefill_attention_flops_per_s: useful FLOP/s of prompt attention on the CPU; 0 = GEMM rate.
    elementwise_gbps: GB/s of the CPU's non-GEMM activation passes; 0 = not modelled.
    """
    device: str = "cpu"
    gemm_flops_per_s: Mapping[str, float] = field(default_factory=dict)
    host_mem_bw_gbps: float = 0.0
    cpu_attention_gbps: float = 0.0
    h2d_gbps: float = 0.0
    d2h_gbps: float = 0.0
    device_mem_bw_gbps: float = 0.0
    device_attention_gbps: float = 0.0
    device_memory_bytes: int = 0
    host_memory_bytes: int = 0
    gemm_shapes: Mapping[str, Any] = field(default_factory=dict)
    gemm_half_rate_tokens: float = 0.0
    cpu_flops_per_s: float = 0.0
    prefill_attention_flops_per_s: float = 0.0
    elementwise_gbps: float = 0.0
    op_overhead_s: float | None = None
    sync_overhead_s: float | None = None
    seq_overhead_s: float = SEQ_OVERHEAD_S
    source: str = "explicit"

    def __post_init__(self):
        kind = str(self.device).partition(":")[0]
        if kind not in ("cpu", "cuda"):
            raise ConfigError(f"hardware: device must be 'cpu' or 'cuda', not {self.device!r}")
        self.device = kind
        if isinstance(self.gemm_flops_per_s, (int, float)):
            self.gemm_flops_per_s = {d: float(self.gemm_flops_per_s) for d in ("float32", "bfloat16", "float16")}
        need = ["host_mem_bw_gbps", "cpu_attention_gbps"]
        if kind == "cuda":
            need += ["h2d_gbps", "device_mem_bw_gbps"]
        missing = [n for n in need if not getattr(self, n) or getattr(self, n) <= 0]
        if not any(v > 0 for v in self.gemm_flops_per_s.values()):
            missing.insert(0, "gemm_flops_per_s")
        if missing:
            raise ConfigError(f"hardware ({self.source}, device {kind}): {', '.join(missing)} must be > 0")
        if self.d2h_gbps <= 0:
            self.d2h_gbps = self.h2d_gbps
        if self.device_attention_gbps <= 0:
            self.device_attention_gbps = self.device_mem_bw_gbps
        if self.op_overhead_s is None:
            self.op_overhead_s = CUDA_OP_OVERHEAD_S if kind == "cuda" else CPU_OP_OVERHEAD_S
        if self.sync_overhead_s is None:
            self.sync_overhead_s = CUDA_SYNC_OVERHEAD_S if kind == "cuda" else 0.0
        self._curves: dict[str, GemmCurve] = {}

    # -- construction --

    @classmethod
    def from_probe(cls, result: Mapping[str, Any], **overrides) -> "Hardware":
        """From a probe() result (moegen.planner.probe); keyword overrides win."""
        def need(*keys):
            node = result
            for key in keys:
                if not isinstance(node, Mapping) or key not in node:
                    raise ConfigError(f"probe result: {'.'.join(keys)} is missing")
                node = node[key]
            return node

        device = str(need("device")).partition(":")[0]
        shapes = {}
        for dtype, r in (result.get("gemm") or {}).items():
            shapes[dtype] = tuple((s["m"], s["k"], s["n"], s.get("sustained_flops_per_s") or s["flops_per_s"])
                                  for s in r.get("shapes", ()) if "flops_per_s" in s and not s.get("calibration"))
        best = dict(need("gemm_best_flops_per_s"))
        kw = dict(device=device, gemm_flops_per_s=best, gemm_shapes=shapes,
                  host_mem_bw_gbps=float(need("host_mem_bw_gbps")),
                  cpu_attention_gbps=float(need("cpu_attention", "kv_gbps")),
                  host_memory_bytes=int(result.get("host_memory_bytes", 0)),
                  source=f"probe {result.get('hostname', '?')}/{result.get('device', '?')}")
        if device == "cuda":
            kw.update(h2d_gbps=float(need("h2d_pinned_gbps")), d2h_gbps=float(result.get("d2h_pinned_gbps", 0)),
                      device_mem_bw_gbps=float(need("device_mem_bw_gbps")),
                      device_attention_gbps=float((result.get("device_attention") or {}).get("kv_gbps", 0)),
                      device_memory_bytes=int(result.get("gpu_memory_bytes", 0)))
        else:   # the CPU is the compute device: its GEMM rate also bounds attention FLOPs
            kw.update(cpu_flops_per_s=float(best.get("bfloat16") or max(best.values())),
                      prefill_attention_flops_per_s=float((result.get("cpu_prefill_attention") or {}).get("flops_per_s", 0)),
                      elementwise_gbps=float(result.get("elementwise_gbps") or 0))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("gemm_shapes", "source")]

    def replace(self, **changes) -> "Hardware":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw.update(changes)
        return Hardware(**kw)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["gemm_shapes"] = {d: [list(r) for r in rows] for d, rows in self.gemm_shapes.items()}
        return out

    # -- rates --

    def curve(self, dtype: str) -> GemmCurve:
        """The GEMM curve of dtype (fp8 and unknown dtypes fall back to bfloat16's)."""
        if dtype not in self._curves:
            name = dtype if self.gemm_flops_per_s.get(dtype, 0) > 0 else "bfloat16"
            if self.gemm_flops_per_s.get(name, 0) <= 0:
                name = max(self.gemm_flops_per_s, key=self.gemm_flops_per_s.get)
            self._curves[dtype] = GemmCurve(self.gemm_flops_per_s[name], self.gemm_shapes.get(name, ()),
                                            self.gemm_half_rate_tokens)
        return self._curves[dtype]

    def gemm_rate(self, dtype: str, m: float, k: int, n: int) -> float:
        return self.curve(dtype).rate(m, k, n)

    @property
    def weight_read_gbps(self) -> float:
        """Bandwidth at which the compute device reads weights (resident or freshly streamed)."""
        return self.device_mem_bw_gbps if self.device == "cuda" else self.host_mem_bw_gbps


# ---- weights: the engine's groups, resident set and buffers -------------------------------------

def model_group_bytes(spec: ModelSpec, dtype_bytes: float) -> int:
    """Embedding, final norm and lm_head: the engine keeps them on the device always."""
    by_module = spec.weight_bytes(dtype_bytes)
    return by_module["embedding"] + by_module["lm_head"] + int(spec.hidden_size * dtype_bytes)


def dense_group_bytes(spec: ModelSpec, layer: int, dtype_bytes: float) -> int:
    """A layer's non-expert weights (attention, norms, router, shared experts or dense MLP)."""
    w = spec.layer_weight_bytes(layer, dtype_bytes)
    return w["total"] - w["routed_experts"]


def buffer_bytes(spec: ModelSpec, dtype_bytes: float) -> int:
    """One streaming buffer: the engine sizes its pool by the largest non-"model" group."""
    dense = max(dense_group_bytes(spec, i, dtype_bytes) for i in range(spec.num_layers))
    return max(dense, spec.expert_bytes(dtype_bytes) if spec.num_moe_layers else 0)


@dataclass(frozen=True)
class ResidentSet:
    dense: tuple[bool, ...]        # per layer: dense group resident
    experts: tuple[int, ...]       # per layer: routed experts resident
    used_bytes: int                # model group included

    def fraction(self, spec: ModelSpec, dtype_bytes: float) -> float:
        return self.used_bytes / spec.weight_bytes(dtype_bytes)["total"]


def resident_set(spec: ModelSpec, budget_bytes: int | None, dtype_bytes: float) -> ResidentSet:
    """What engine.memory.choose_resident keeps within budget_bytes: the model group (always),
    then dense groups in layer order, then experts layer by layer, skipping what does not fit.
    None = everything (CPU, or a device that holds the whole model)."""
    n, experts = spec.num_layers, spec.num_experts
    moe = spec.moe_layer_mask
    if budget_bytes is None:
        everything = spec.weight_bytes(dtype_bytes)["total"]
        return ResidentSet((True,) * n, tuple(experts if m else 0 for m in moe), everything)
    used = model_group_bytes(spec, dtype_bytes)      # forced resident, counted against the budget
    dense = []
    for i in range(n):
        size = dense_group_bytes(spec, i, dtype_bytes)
        fits = used + size <= budget_bytes
        used += size if fits else 0
        dense.append(fits)
    per_expert = spec.expert_bytes(dtype_bytes)
    room = max(budget_bytes - used, 0)
    total_fit = room // per_expert if per_expert else 0
    resident, left = [], total_fit
    for m in moe:
        take = min(experts, left) if m else 0
        resident.append(take)
        left -= take
    used += (total_fit - left) * per_expert
    return ResidentSet(tuple(dense), tuple(resident), used)


# ---- activations ------------------------------------------------------------------------------

def activation_bytes(spec: ModelSpec, tokens: int, out_rows: int, expert_rows: int, dtype_bytes: float,
                     prefill: bool = False) -> int:
    """Working set of one forward pass over `tokens` tokens: residual stream and attention
    projections, router scores, the widest dense/shared FFN, one expert GEMM chain over
    expert_rows rows, and out_rows rows of fp32 logits for sampling."""
    h, a = spec.hidden_size, spec.attention
    if a.kind == "mla":
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        latent = a.kv_lora_rank + a.qk_rope_head_dim
        # prefill expands per-head q, k, v (+ output); decode's absorbed query and output are latent-wide
        attn = a.n_heads * (2 * qk + 2 * a.v_head_dim) if prefill else a.n_heads * 2 * latent
        attn += a.kv_lora_rank + a.qk_rope_head_dim + a.q_lora_rank
    else:
        attn = 2 * a.n_heads * a.head_dim + 2 * a.n_kv_heads * a.head_dim
    ffn = 3 * max(spec.dense_intermediate, spec.shared_intermediate)
    per_token = (4 * h + attn + ffn) * dtype_bytes + spec.num_experts * 8 + spec.top_k * 24
    expert = expert_rows * (2 * h + 3 * spec.expert_intermediate) * dtype_bytes
    logits = out_rows * spec.vocab_size * (dtype_bytes + 8)
    return int(ACTIVATION_SLACK * (tokens * per_token + expert + logits))


# ---- one forward pass -------------------------------------------------------------------------

@dataclass
class _Pass:
    """Cost of one forward pass: time by the engine's schedule, terms, and the HRM ideal."""
    time_s: float = 0.0
    ideal_s: float = 0.0
    terms_s: dict = field(default_factory=lambda: dict.fromkeys(TERMS, 0.0))

    def add(self, other: "_Pass", times: float = 1.0) -> None:
        self.time_s += other.time_s * times
        self.ideal_s += other.ideal_s * times
        for key, value in other.terms_s.items():
            self.terms_s[key] += value * times


def _gemm(hw: Hardware, dtype: str, rows: float, k: int, n: int, weight_bytes: float, terms: dict) -> float:
    """One weight matrix over `rows` rows: max(compute, weight read); charges terms."""
    if rows <= 0 or k * n <= 0:
        return 0.0
    compute_s = 2.0 * rows * k * n / hw.gemm_rate(dtype, rows, k, n)
    memory_s = weight_bytes / (hw.weight_read_gbps * GB)
    if compute_s >= memory_s:
        terms["compute"] += compute_s
        return compute_s
    terms["memory"] += memory_s
    return memory_s


def _dense_linears(spec: ModelSpec, layer: int) -> list[tuple[int, int]]:
    """(in, out) of the layer's dense weight matrices that every token goes through."""
    h, a = spec.hidden_size, spec.attention
    if a.kind == "mla":
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        q = [(h, a.q_lora_rank), (a.q_lora_rank, a.n_heads * qk)] if a.q_lora_rank else [(h, a.n_heads * qk)]
        mats = q + [(h, a.kv_lora_rank + a.qk_rope_head_dim),
                    (a.kv_lora_rank, a.n_heads * (a.qk_nope_head_dim + a.v_head_dim)), (a.n_heads * a.v_head_dim, h)]
    else:
        q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        mats = [(h, q + 2 * kv), (q, h)]
    if spec.moe_layer_mask[layer]:
        mats.append((h, spec.num_experts))
        if spec.shared_intermediate:
            mats += [(h, 2 * spec.shared_intermediate), (spec.shared_intermediate, h)]
    elif spec.dense_intermediate:
        mats += [(h, 2 * spec.dense_intermediate), (spec.dense_intermediate, h)]
    return mats


def _attention_link_bytes(spec: ModelSpec, dtype_bytes: float) -> tuple[float, float]:
    """Per token per layer with CPU decode attention on a GPU engine: (device->host, host->device)
    bytes: q and the new K/V (or MLA's absorbed query and latent) out, the attention output back."""
    a = spec.attention
    if a.kind == "mla":
        r = a.kv_lora_rank + a.qk_rope_head_dim
        return (a.n_heads * r + r) * dtype_bytes, a.n_heads * a.kv_lora_rank * dtype_bytes
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return (q + 2 * kv) * dtype_bytes, q * dtype_bytes


@dataclass(frozen=True)
class _PassShape:
    phase: str           # "prefill" | "decode"
    tokens: int          # rows through the layer
    seqs: int            # sequences (attention micro-batching, logits rows)
    kv_read_bytes: float  # decode: KV bytes all seqs read, all layers; prefill: 0
    core_flops: float    # attention core FLOPs, all seqs, all layers


def _qk_width(spec: ModelSpec) -> int:
    """Width of one head's q.k product in prefill (MLA runs expanded there)."""
    a = spec.attention
    return a.qk_nope_head_dim + a.qk_rope_head_dim if a.kind == "mla" else a.head_dim


def _layer_cost(spec: ModelSpec, hw: Hardware, plan, wl: Workload, shape: _PassShape, layer: int,
                resident: ResidentSet) -> _Pass:
    db, dtype, L = wl.dtype_bytes, wl.dtype, spec.num_layers
    cuda = hw.device == "cuda"
    terms = dict.fromkeys(TERMS, 0.0)
    T, S = shape.tokens, shape.seqs
    A = plan.attn_micro_batch or S
    micro_batches = math.ceil(S / max(A, 1))
    overhead = lambda ops: ops * hw.op_overhead_s  # noqa: E731
    # the CPU runs ops one after another; a GPU runs kernels while Python enqueues the next ones,
    # so between host syncs (routing's counts, CPU attention) the slower of the two sets the pace
    busy = (lambda work_s, ops_s: max(work_s, ops_s)) if cuda else (lambda work_s, ops_s: work_s + ops_s)

    # dense projections (+ router, shared experts / dense MLP); weight bytes spread over matrices
    mats = _dense_linears(spec, layer)
    dense_bytes = dense_group_bytes(spec, layer, db)
    mat_params = sum(k * n for k, n in mats) or 1
    dense_s = sum(_gemm(hw, dtype, T, k, n, dense_bytes * k * n / mat_params, terms) for k, n in mats)
    ffn_s = 0.0
    if not spec.moe_layer_mask[layer] and spec.dense_intermediate:
        # a dense MLP layer's FFN overlaps the next layer's dense-group copy (announced before it)
        ffn_s = sum(_gemm(hw, dtype, T, k, n, 0.0, dict.fromkeys(TERMS, 0.0)) for k, n in mats[-2:])
    layer_ops = OPS_PER_LAYER + OPS_PER_MICRO_BATCH * micro_batches
    if shape.phase == "prefill":
        layer_ops += OPS_PER_PROMPT * S
    dense_s = busy(dense_s, overhead(layer_ops))
    terms["overhead"] += overhead(layer_ops)

    # attention
    kv_layer = shape.kv_read_bytes / L
    core_layer = shape.core_flops / L
    link_s = sync_s = 0.0
    if shape.phase == "prefill":   # scores [P, w] x [w, P] per head: rate at P rows
        rate = hw.gemm_rate(dtype, wl.prompt_len, _qk_width(spec), wl.prompt_len)
        if not cuda and hw.prefill_attention_flops_per_s > 0:
            rate = hw.prefill_attention_flops_per_s
        attn_s = core_layer / rate
        if cuda:   # the prompt's K/V go to the host cache
            link_s = T * spec.kv_bytes_per_token(db) / L / (hw.d2h_gbps * GB)
        phase_a = attn_s + link_s
    else:
        cpu_s = kv_layer / (hw.cpu_attention_gbps * GB)
        if hw.cpu_flops_per_s > 0:
            cpu_s = max(cpu_s, core_layer / hw.cpu_flops_per_s)
        placement = plan.attention if cuda else "cpu"
        if placement == "cpu":
            attn_s = cpu_s
            if cuda:
                out_b, back_b = _attention_link_bytes(spec, db)
                link_s = S * (out_b / (hw.d2h_gbps * GB) + back_b / (hw.h2d_gbps * GB))
                sync_s = micro_batches * hw.sync_overhead_s
            phase_a = attn_s + link_s + sync_s
        else:
            # GPU attention over host KV: each micro-batch's KV crosses PCIe, overlapped with the
            # previous micro-batch's attention; "split" puts a fraction of the sequences there and
            # the rest on the CPU at the same time, balanced so both finish together
            pcie_s = kv_layer / (hw.h2d_gbps * GB)
            dev_s = kv_layer / (hw.device_attention_gbps * GB)
            gpu_s = max(pcie_s, dev_s) + min(pcie_s, dev_s) / micro_batches
            f = 1.0 if placement == "gpu" else cpu_s / (cpu_s + gpu_s)
            link_s, attn_s = f * pcie_s, f * dev_s + (1 - f) * cpu_s
            sync_s = micro_batches * hw.sync_overhead_s
            phase_a = max(f * gpu_s, (1 - f) * cpu_s) + sync_s
    terms["attention"] += attn_s
    terms["kv"] += link_s
    terms["overhead"] += sync_s

    # routed experts: D distinct, T*k/D rows each, chunked
    expert_s = x_expert_s = first_copy_s = one_compute_s = 0.0
    streamed_experts = 0.0
    if spec.moe_layer_mask[layer]:
        E, k, I, H = spec.num_experts, spec.top_k, spec.expert_intermediate, spec.hidden_size
        distinct = expected_distinct_experts(E, k, T)
        rows = T * k / distinct if distinct else 0.0
        chunks = max(1, math.ceil(rows / plan.expert_chunk)) if plan.expert_chunk else 1
        per_rows = rows / chunks
        ebytes = spec.expert_bytes(db)
        one = dict.fromkeys(TERMS, 0.0)
        per_chunk = (_gemm(hw, dtype, per_rows, H, 2 * I, ebytes * 2 / 3, one)
                     + _gemm(hw, dtype, per_rows, I, H, ebytes / 3, one))
        one_compute_s = busy(chunks * per_chunk, overhead(OPS_PER_EXPERT_CHUNK * chunks + 2))
        for key in ("compute", "memory"):
            terms[key] += distinct * chunks * one[key]
        expert_s = distinct * one_compute_s
        terms["overhead"] += distinct * overhead(OPS_PER_EXPERT_CHUNK * chunks + 2)
        if cuda:
            streamed_experts = distinct * (E - resident.experts[layer]) / E
            first_copy_s = ebytes / (hw.h2d_gbps * GB)
            x_expert_s = streamed_experts * first_copy_s

    # weight transfer and the schedule
    x_dense_s = 0.0 if (not cuda or resident.dense[layer]) else dense_bytes / (hw.h2d_gbps * GB)
    terms["pcie"] += x_expert_s + x_dense_s
    pre_s = max(dense_s - ffn_s, 0.0) + phase_a
    if not cuda and hw.elementwise_gbps > 0:    # the CPU runs these passes between its GEMMs
        elementwise_s = T * spec.elementwise_elems_per_token(layer) * db / (hw.elementwise_gbps * GB)
        terms["elementwise"] += elementwise_s
        pre_s += elementwise_s
    if not cuda:
        layer_s = pre_s + ffn_s + expert_s
        ideal_s = layer_s
    else:
        expert_buffers = plan.num_buffers - (0 if resident.dense[layer] else 1)
        if streamed_experts > 0 and expert_buffers >= 2:
            tail = max(x_expert_s + x_dense_s + one_compute_s, first_copy_s + expert_s)
        elif streamed_experts > 0:
            tail = x_expert_s + x_dense_s + expert_s
        else:
            tail = max(expert_s + ffn_s, x_dense_s)
        layer_s = pre_s + tail
        cpu_side = attn_s if (shape.phase == "decode" and plan.attention != "gpu") else 0.0
        gpu_side = dense_s + expert_s + (attn_s - cpu_side)
        ideal_s = max(x_expert_s + x_dense_s + link_s, cpu_side, gpu_side)
    return _Pass(layer_s, ideal_s, terms)


def _pass_cost(spec: ModelSpec, hw: Hardware, plan, wl: Workload, shape: _PassShape, resident: ResidentSet) -> _Pass:
    """All layers plus the step's own work (embedding, lm_head, sampling, the first dense copy)."""
    out = _Pass()
    memo: dict[tuple, _Pass] = {}
    for layer in range(spec.num_layers):
        key = (spec.moe_layer_mask[layer], resident.dense[layer], resident.experts[layer], spec.sliding_window(layer))
        if key not in memo:
            memo[key] = _layer_cost(spec, hw, plan, wl, shape, layer, resident)
        out.add(memo[key])
    terms = dict.fromkeys(TERMS, 0.0)
    lm_bytes = spec.vocab_size * spec.hidden_size * wl.dtype_bytes
    step_s = _gemm(hw, wl.dtype, shape.seqs, spec.hidden_size, spec.vocab_size, lm_bytes, terms)
    logits_s = shape.seqs * spec.vocab_size * 12 / (hw.weight_read_gbps * GB)   # softmax/argmax passes
    terms["memory"] += logits_s
    fixed_s = OPS_PER_STEP * hw.op_overhead_s + hw.seq_overhead_s * shape.seqs
    terms["overhead"] += fixed_s
    first_copy_s = 0.0
    if hw.device == "cuda" and not resident.dense[0]:   # nothing to hide the first layer's copy behind
        first_copy_s = dense_group_bytes(spec, 0, wl.dtype_bytes) / (hw.h2d_gbps * GB)
        terms["pcie"] += first_copy_s
    step_s += logits_s + fixed_s + first_copy_s
    out.add(_Pass(step_s, step_s, terms))
    return out


# ---- the whole run ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """Predicted times and rates of one workload under one plan.

    Tokens per second follow moegen.harness.metrics: prefill = prompt tokens / prefill time; decode =
    decode-step tokens (each sequence's first new token comes from prefill) / decode time;
    end-to-end = generated tokens / total time. *_layer_s: one layer of a full pass (mean over
    layers), decode at the mean context. bound: the largest term over the whole run."""
    prefill_s: float
    decode_s: float
    total_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    e2e_tokens_per_s: float
    prefill_layer_s: float
    decode_layer_s: float
    decode_step_s: float
    bound: str
    prefill_bound: str
    decode_bound: str
    terms_s: dict                    # {"prefill": {term: s}, "decode": {term: s}} over the run
    ideal_decode_tokens_per_s: float  # HRM bound: every term overlapped
    batch: int                       # sequences decoding together (G, capped by num_sequences)
    waves: int
    prefill_passes: int
    decode_steps: int
    resident_fraction: float
    notes: tuple = ()

    def summary(self) -> dict:
        return asdict(self)


def _bound(terms: Mapping[str, float]) -> str:
    return max(TERMS, key=lambda t: terms.get(t, 0.0))


def _check_plan(spec: ModelSpec, hw: Hardware, plan) -> None:
    device = str(plan.device).partition(":")[0]
    if device != hw.device:
        raise PlanError(f"plan is for device {plan.device!r} but the hardware constants describe {hw.device!r}")
    if plan.attention not in ATTENTION_PLACEMENTS:
        raise PlanError(f"attention placement must be one of {', '.join(ATTENTION_PLACEMENTS)}, not {plan.attention!r}")
    if device == "cpu" and plan.attention != "cpu":
        raise PlanError(f"attention placement {plan.attention!r} needs a GPU; on the CPU it is 'cpu'")
    if plan.max_batch < 1:
        raise PlanError(f"max_batch must be >= 1, got {plan.max_batch}")
    if device == "cuda" and plan.num_buffers < 2:
        raise PlanError(f"num_buffers must be >= 2 with streaming, got {plan.num_buffers}")


def predict(spec: ModelSpec, hw: Hardware, plan, workload: Workload) -> Prediction:
    """Predicted times for `workload` under `plan` (a moegen.planner.search.Plan or anything with
    its fields). Sequences run in waves of G = plan.max_batch: each wave's prompts are prefilled in
    passes of max_prefill_tokens // prompt_len prompts, then gen_len - 1 decode steps in lockstep
    (equal lengths and no early stop, so the engine's waves are exactly these)."""
    _check_plan(spec, hw, plan)
    wl, db = workload, workload.dtype_bytes
    resident = resident_set(spec, plan.resident_bytes if hw.device == "cuda" else None, db)
    G = max(1, min(plan.max_batch, wl.num_sequences))
    P, steps = wl.prompt_len, wl.gen_len - 1
    per_pass = max(1, min(G, plan.max_prefill_tokens // P))
    core_prefill = spec.prefill_flops(P) - P * spec.context_free_flops() - spec.lm_head_flops()
    if steps:
        kv_step = spec.decode_kv_read_bytes(P, wl.gen_len, db) / steps    # mean over the steps
        core_step = (spec.decode_steps_flops(P, wl.gen_len)
                     - steps * (spec.context_free_flops() + spec.lm_head_flops())) / steps
    else:
        kv_step = core_step = 0.0
    cache: dict[tuple, _Pass] = {}

    def cost(phase: str, seqs: int) -> _Pass:
        if (phase, seqs) not in cache:
            if phase == "prefill":
                shape = _PassShape("prefill", seqs * P, seqs, 0.0, seqs * core_prefill)
            else:
                shape = _PassShape("decode", seqs, seqs, seqs * kv_step, seqs * core_step)
            cache[phase, seqs] = _pass_cost(spec, hw, plan, wl, shape, resident)
        return cache[phase, seqs]

    full_waves, last = divmod(wl.num_sequences, G)
    waves = [(G, full_waves)] + ([(last, 1)] if last else [])
    prefill, decode = _Pass(), _Pass()
    passes = 0
    for size, count in waves:
        n_full, rest = divmod(size, per_pass)
        prefill.add(cost("prefill", per_pass), n_full * count)
        if rest:
            prefill.add(cost("prefill", rest), count)
        passes += (n_full + (1 if rest else 0)) * count
        if steps:
            decode.add(cost("decode", size), steps * count)

    prompt_tokens, decode_tokens = wl.num_sequences * P, wl.num_sequences * steps
    generated = wl.num_sequences * wl.gen_len
    total_s = prefill.time_s + decode.time_s
    rate = lambda n, s: n / s if s > 0 else 0.0   # noqa: E731
    full_prefill, full_decode = cost("prefill", per_pass), cost("decode", G) if steps else _Pass()
    all_terms = {t: prefill.terms_s[t] + decode.terms_s[t] for t in TERMS}
    notes = []
    if hw.device == "cuda" and plan.attention != "cpu":
        notes.append(f"decode attention '{plan.attention}' is modelled; the engine runs decode attention on the CPU")
    return Prediction(
        prefill_s=prefill.time_s, decode_s=decode.time_s, total_s=total_s,
        prefill_tokens_per_s=rate(prompt_tokens, prefill.time_s),
        decode_tokens_per_s=rate(decode_tokens, decode.time_s),
        e2e_tokens_per_s=rate(generated, total_s),
        prefill_layer_s=full_prefill.time_s / spec.num_layers,
        decode_layer_s=full_decode.time_s / spec.num_layers,
        decode_step_s=full_decode.time_s,
        bound=_bound(all_terms), prefill_bound=_bound(prefill.terms_s), decode_bound=_bound(decode.terms_s),
        terms_s={"prefill": dict(prefill.terms_s), "decode": dict(decode.terms_s)},
        ideal_decode_tokens_per_s=rate(decode_tokens, decode.ideal_s),
        batch=G, waves=full_waves + (1 if last else 0), prefill_passes=passes,
        decode_steps=steps * (full_waves + (1 if last else 0)),
        resident_fraction=resident.fraction(spec, db), notes=tuple(notes))
