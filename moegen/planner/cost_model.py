"""Roofline cost model of a moegen run, with measured hardware constants (planner.hardware) and
the engine's memory accounting (planner.memory).

Per layer of a forward pass (a prefill pass over many prompts, or a decode step over the global
batch) the model charges, after MoE-Lightning's hierarchical roofline (HRM):

- pcie:      streamed weights host -> device (the layer's dense group when not resident, plus the
             *distinct* experts that received tokens and are not resident), over h2d bandwidth;
- disk:      on the CPU with the disk tier (plan.resident_bytes set: the weights host memory
             holds), the same streamed weights read from the checkpoint's files, over the disk
             read bandwidth; they pipeline with compute through the buffer pool as PCIe copies do;
             on a GPU with the disk tier (plan.host_resident_bytes set), the streamed weights host
             memory does not hold either, over the disk read bandwidth instead of PCIe's;
- kv:        other PCIe traffic: in decode q/k/v out and the attention output back (decode
             attention runs on the CPU over the host KV cache), in prefill the prompt's K/V
             written to the host cache;
- attention: attention compute (decode: on the CPU, KV bytes / measured attention rate; prefill:
             core FLOPs / GEMM rate);
- compute / memory: each GEMM group (dense projections, each expert, lm_head) costs
             max(FLOPs / achieved rate at its row count, weight bytes / memory bandwidth), charged
             to "compute" or "memory" by whichever is larger;
- elementwise: on the CPU, the non-GEMM passes over activations (norms, RoPE, residual adds, the
             expert gather/activation/combine): their bytes over the probe's elementwise bandwidth;
- dequant:   quantized weights (spec.weight_format) dequantized before each GEMM, on the compute
             device: their parameters over the probe's dequantization rate (an expert once per
             chunk of its rows); their stored bytes already price pcie and memory;
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
On the CPU one device does it all: the terms add, but for the disk tier's reads, which a reader
thread does beside the compute (the same two-stage pipeline as the copies on a GPU).
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
from dataclasses import asdict, dataclass, field
from typing import Mapping, NamedTuple

from moegen.errors import InputError
from moegen.planner.hardware import GB, INT8_COMPUTE, Hardware
from moegen.planner.memory import ResidentSet, attention_link_bytes, dense_group_bytes, resident_set
from moegen.planner.model_spec import ModelSpec, expected_distinct_experts
from moegen.planner.plan import PlanError
from moegen.planner.policy import MIN_NUM_BUFFERS

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
               "float8_e4m3fn": 1, "fp8": 1}
_CANONICAL_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp8": "float8_e4m3fn"}
TERMS = ("pcie", "disk", "kv", "attention", "compute", "memory", "elementwise", "dequant", "overhead")

# Ops per unit of work in the runner (runner.py, layers/): counted from the code, approximately.
OPS_PER_LAYER = 20             # norms, router (linear, softmax, top-k, sort, bincount), residual adds
OPS_PER_MICRO_BATCH = 15       # q/k/v/o projections, rope, cache write, attention, concat
OPS_PER_EXPERT_CHUNK = 8       # gather, gate_up, act, mul, down, weight, scatter
OPS_PER_PROMPT = 4             # prefill attends prompt by prompt (slice, SDPA, transposes)
OPS_PER_STEP = 30              # embedding, final norm, lm_head, sampling, step inputs


def dtype_bytes_of(dtype: str) -> int:
    try:
        return DTYPE_BYTES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}") from None


# ---- the job ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobShape:
    """The job the cost model prices: num_sequences prompts of prompt_len tokens, each generating
    gen_len tokens (no early EOS), in dtype (weights, activations and KV cache).
    computed_prompt_len: the prompt tokens prefill computes per sequence on average when shared
    prefixes are reused (the rest of each prompt's K/V comes from the cache); None = all. It is
    also the mean KV a sequence adds beside the shared blocks, which are held once."""
    prompt_len: int
    gen_len: int
    num_sequences: int = 1
    dtype: str = "bfloat16"
    computed_prompt_len: int | None = None
    # the routed experts multiplied in int8 (experts_kernel=int8): priced at that kernel's measured rate
    experts_int8: bool = False

    def __post_init__(self):
        for name in ("prompt_len", "gen_len", "num_sequences"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"job shape: {name} must be >= 1, got {getattr(self, name)}")
        if self.computed_prompt_len is not None and not 1 <= self.computed_prompt_len <= self.prompt_len:
            raise InputError(f"job shape: computed_prompt_len must be in [1, prompt_len={self.prompt_len}], "
                             f"got {self.computed_prompt_len}")
        dtype_bytes_of(self.dtype)
        object.__setattr__(self, "dtype", _CANONICAL_DTYPE.get(self.dtype.lower(), self.dtype.lower()))

    @classmethod
    def from_lengths(cls, prompt_lens: list[int], gen_len: int, dtype: str,
                     computed_tokens: int | None = None, experts_int8: bool = False) -> "JobShape":
        """One call's ragged prompts as equal ones of their mean length (the model's assumption);
        computed_tokens: of all their tokens, those prefill computes (None = all); experts_int8: the
        engine multiplies its experts in int8 (experts_kernel=int8)."""
        mean = max(1, round(sum(prompt_lens) / len(prompt_lens)))
        computed = None
        if computed_tokens is not None and computed_tokens < sum(prompt_lens):
            computed = min(mean, max(1, round(computed_tokens / len(prompt_lens))))
        return cls(mean, gen_len, len(prompt_lens), dtype, computed, experts_int8)

    @property
    def prefill_len(self) -> int:
        """Prompt tokens prefill computes per sequence."""
        return self.computed_prompt_len or self.prompt_len

    @property
    def kv_tokens(self) -> int:
        """KV tokens per sequence, shared prefixes counted once (a mean)."""
        return self.prefill_len + self.gen_len

    @property
    def dtype_bytes(self) -> int:
        return dtype_bytes_of(self.dtype)

    @property
    def seq_tokens(self) -> int:
        return self.prompt_len + self.gen_len


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


@dataclass(frozen=True)
class _PassShape:
    phase: str           # "prefill" | "decode"
    tokens: int          # rows through the layer
    seqs: int            # sequences (attention micro-batching, logits rows)
    kv_read_bytes: float  # decode: KV bytes all seqs read, all layers; prefill: 0
    core_flops: float    # attention core FLOPs, all seqs, all layers


class _Experts(NamedTuple):
    """A layer's routed experts: compute_s of all, copy_s of the streamed ones, and one expert's
    copy and compute (the ends of the copy/compute pipeline)."""
    compute_s: float = 0.0
    copy_s: float = 0.0
    one_copy_s: float = 0.0
    one_compute_s: float = 0.0
    streamed: float = 0.0       # expected distinct experts not resident


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


def _busy(cuda: bool):
    """Time of `work_s` of kernels enqueued by `ops_s` of dispatch: the CPU runs ops one after
    another; a GPU runs kernels while Python enqueues the next ones, so between host syncs
    (routing's counts, CPU attention) the slower of the two sets the pace."""
    return (lambda work_s, ops_s: max(work_s, ops_s)) if cuda else (lambda work_s, ops_s: work_s + ops_s)


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


def _dense_dequant_s(spec: ModelSpec, hw: Hardware, layer: int) -> float:
    """Dequantizing a layer's quantized dense weights (attention, shared experts or dense MLP)."""
    if not spec.weight_format:
        return 0.0
    ffn = spec.shared_expert_params() if spec.moe_layer_mask[layer] else spec.dense_mlp_params()
    return hw.dequant_s(spec.weight_format, spec.attention.quantized_params(spec.hidden_size) + ffn)


def _qk_width(spec: ModelSpec) -> int:
    """Width of one head's q.k product in prefill (MLA runs expanded there)."""
    a = spec.attention
    return a.qk_nope_head_dim + a.qk_rope_head_dim if a.kind == "mla" else a.head_dim




def _dense_cost(spec: ModelSpec, hw: Hardware, wl: JobShape, shape: _PassShape, layer: int, micro_batches: int,
                terms: dict) -> tuple[float, float]:
    """(time of the dense projections, router and shared experts / dense MLP with their dispatch;
    the dense MLP's share of it, which overlaps the next layer's dense-group copy)."""
    mats = _dense_linears(spec, layer)
    dense_bytes = dense_group_bytes(spec, layer, wl.dtype_bytes)
    mat_params = sum(k * n for k, n in mats) or 1        # weight bytes spread over the matrices
    dense_s = sum(_gemm(hw, wl.dtype, shape.tokens, k, n, dense_bytes * k * n / mat_params, terms) for k, n in mats)
    dequant_s = _dense_dequant_s(spec, hw, layer)
    terms["dequant"] += dequant_s
    dense_s += dequant_s
    ffn_s = 0.0
    if not spec.moe_layer_mask[layer] and spec.dense_intermediate:
        # a dense MLP layer's FFN overlaps the next layer's dense-group copy (announced before it)
        ffn_s = sum(_gemm(hw, wl.dtype, shape.tokens, k, n, 0.0, dict.fromkeys(TERMS, 0.0)) for k, n in mats[-2:])
    layer_ops = OPS_PER_LAYER + OPS_PER_MICRO_BATCH * micro_batches
    if shape.phase == "prefill":
        layer_ops += OPS_PER_PROMPT * shape.seqs
    ops_s = layer_ops * hw.op_overhead_s
    terms["overhead"] += ops_s
    return _busy(hw.device == "cuda")(dense_s, ops_s), ffn_s


def _attention_cost(spec: ModelSpec, hw: Hardware, wl: JobShape, shape: _PassShape, micro_batches: int,
                    terms: dict, on_device: bool = False) -> tuple[float, float, float]:
    """(attention compute, its PCIe traffic, host syncs) of one layer. Prefill attends on the
    compute device; decode on the CPU over the host KV cache, or (on_device) on the GPU over a
    KV cache in its memory."""
    cuda, L = hw.device == "cuda", spec.num_layers
    core_layer = shape.core_flops / L
    link_s = sync_s = 0.0
    if shape.phase == "prefill":   # scores [P, w] x [w, P] per head: rate at P rows
        rate = hw.gemm_rate(wl.dtype, wl.prompt_len, _qk_width(spec), wl.prompt_len)
        if not cuda and hw.prefill_attention_flops_per_s > 0:
            rate = hw.prefill_attention_flops_per_s
        attn_s = core_layer / rate
        if cuda and not on_device:   # the prompt's K/V go to the host cache
            link_s = shape.tokens * spec.kv_bytes_per_token(wl.dtype_bytes) / L / (hw.d2h_gbps * GB)
    elif on_device:
        attn_s = shape.kv_read_bytes / L / (hw.device_mem_bw_gbps * GB)
    else:
        attn_s = shape.kv_read_bytes / L / (hw.cpu_attention_gbps * GB)
        if hw.cpu_flops_per_s > 0:
            attn_s = max(attn_s, core_layer / hw.cpu_flops_per_s)
        if cuda:   # q and the new K/V out, the attention output back, a sync per micro-batch
            out_b, back_b = attention_link_bytes(spec, wl.dtype_bytes)
            link_s = shape.seqs * (out_b / (hw.d2h_gbps * GB) + back_b / (hw.h2d_gbps * GB))
            sync_s = micro_batches * hw.sync_overhead_s
    terms["attention"] += attn_s
    terms["kv"] += link_s
    terms["overhead"] += sync_s
    return attn_s, link_s, sync_s


def _fused_experts_cost(spec: ModelSpec, hw: Hardware, wl: JobShape, distinct: float, rows: float, rate: float,
                       terms: dict, int8: bool = False) -> _Experts:
    """The layer's routed experts through moegen.ops.experts: FLOPs at the kernel's rate for this
    many rows per expert (weight reads included in that measurement), one dispatch; quantized
    experts at their format's measured rate (dequantization inside), or without one at bf16's plus
    each expert's dequantization at the measured rate; `int8`: experts multiplied in int8 (weights
    re-quantized at load, a byte each) at that kernel's measured rate."""
    compute_s = distinct * 6.0 * rows * spec.hidden_size * spec.expert_intermediate / rate
    expert_bytes = spec.expert_params() if int8 else spec.expert_bytes(wl.dtype_bytes)
    memory_s = distinct * expert_bytes / (hw.weight_read_gbps * GB)
    measured = hw.fused_experts_shapes.get(spec.weight_format) if spec.weight_format else None
    dequant_s = 0.0 if measured or int8 or not spec.weight_format else \
        hw.dequant_s(spec.weight_format, distinct * spec.expert_params())
    layer_s = max(compute_s, memory_s) + dequant_s + hw.op_overhead_s
    terms["compute" if compute_s >= memory_s else "memory"] += max(compute_s, memory_s)
    terms["dequant"] += dequant_s
    terms["overhead"] += hw.op_overhead_s
    return _Experts(layer_s, one_compute_s=layer_s / distinct)


def _experts_cost(spec: ModelSpec, hw: Hardware, plan, wl: JobShape, tokens: int, layer: int,
                  resident: ResidentSet, host: ResidentSet, terms: dict) -> _Experts:
    """The layer's routed experts: D distinct, tokens*k/D rows each, in chunks of expert_chunk.
    host: on a GPU with the disk tier, the experts host memory holds (the others come from the files)."""
    if not spec.moe_layer_mask[layer]:
        return _Experts()
    E, k, I, H = spec.num_experts, spec.top_k, spec.expert_intermediate, spec.hidden_size
    distinct = expected_distinct_experts(E, k, tokens)
    rows = tokens * k / distinct if distinct else 0.0
    streams = resident.experts[layer] < E      # some experts of this layer are read each pass
    fused_rate = None
    # the engine's kernels run bf16 models, over experts packed at load (not the disk tier's streamed
    # ones); the int8 one priced only where the probe measured it (else as the exact kernel)
    int8 = wl.experts_int8 and INT8_COMPUTE in hw.fused_experts_shapes
    if hw.device != "cuda" and wl.dtype == "bfloat16" and not streams:
        curve = spec.weight_format if spec.weight_format in hw.fused_experts_shapes else "bfloat16"
        fused_rate = hw.fused_experts_rate(INT8_COMPUTE if int8 else curve, rows, H, I)
    if fused_rate and distinct:     # the engine's fused kernel: one call per layer, its measured rate
        return _fused_experts_cost(spec, hw, wl, distinct, rows, fused_rate, terms, int8=int8)
    chunks = max(1, math.ceil(rows / plan.expert_chunk)) if plan.expert_chunk else 1
    per_rows = rows / chunks
    ebytes = spec.expert_bytes(wl.dtype_bytes)
    one = dict.fromkeys(TERMS, 0.0)
    one["dequant"] = hw.dequant_s(spec.weight_format, spec.expert_params())   # each chunk dequantizes again
    per_chunk = (_gemm(hw, wl.dtype, per_rows, H, 2 * I, ebytes * 2 / 3, one)
                 + _gemm(hw, wl.dtype, per_rows, I, H, ebytes / 3, one) + one["dequant"])
    ops_s = (OPS_PER_EXPERT_CHUNK * chunks + 2) * hw.op_overhead_s
    one_compute_s = _busy(hw.device == "cuda")(chunks * per_chunk, ops_s)
    for key in ("compute", "memory", "dequant"):
        terms[key] += distinct * chunks * one[key]
    terms["overhead"] += distinct * ops_s
    if not streams:
        return _Experts(distinct * one_compute_s, one_compute_s=one_compute_s)
    streamed = distinct * (E - resident.experts[layer]) / E
    from_files = distinct * (E - max(resident.experts[layer], host.experts[layer])) / E
    copy_s = (_charge_copy(hw, (streamed - from_files) * ebytes, False, terms)
              + _charge_copy(hw, from_files * ebytes, True, terms))
    return _Experts(distinct * one_compute_s, copy_s, copy_s / streamed, one_compute_s, streamed)


def _charge_copy(hw: Hardware, nbytes: float, from_files: bool, terms: dict) -> float:
    """Time to bring streamed weights to where they run, charged to its term: from host memory over
    PCIe on a GPU; from the disk on the CPU, and on a GPU for what host memory does not hold either
    (the disk, far slower than PCIe, is then the bound; the copy after it overlaps the next read)."""
    if nbytes <= 0:
        return 0.0
    pcie = hw.device == "cuda" and not from_files
    seconds = nbytes / ((hw.h2d_gbps if pcie else hw.disk_read_gbps) * GB)
    terms["pcie" if pcie else "disk"] += seconds
    return seconds


def _streamed_tail_s(plan, experts: _Experts, dense_copy_s: float, ffn_s: float, dense_resident: bool) -> float:
    """Time after routing on a GPU: experts stream through the buffers left beside a streamed
    dense group, pipelined with their compute when two or more are left; the next layer's dense
    group is copied behind them."""
    if experts.streamed <= 0:
        return max(experts.compute_s + ffn_s, dense_copy_s)
    copies_s = experts.copy_s + dense_copy_s
    if plan.num_buffers - (0 if dense_resident else 1) >= 2:     # one copies while one computes
        return max(copies_s + experts.one_compute_s, experts.one_copy_s + experts.compute_s)
    return copies_s + experts.compute_s


def _layer_cost(spec: ModelSpec, hw: Hardware, plan, wl: JobShape, shape: _PassShape, layer: int,
                resident: ResidentSet, host: ResidentSet) -> _Pass:
    cuda = hw.device == "cuda"
    terms = dict.fromkeys(TERMS, 0.0)
    micro_batches = math.ceil(shape.seqs / max(plan.attn_micro_batch or shape.seqs, 1))
    dense_s, ffn_s = _dense_cost(spec, hw, wl, shape, layer, micro_batches, terms)
    attn_s, link_s, sync_s = _attention_cost(spec, hw, wl, shape, micro_batches, terms,
                                             cuda and getattr(plan, "attention", "cpu") == "device")
    experts = _experts_cost(spec, hw, plan, wl, shape.tokens, layer, resident, host, terms)
    dense_copy_s = 0.0
    if not resident.dense[layer]:
        dense_copy_s = _charge_copy(hw, dense_group_bytes(spec, layer, wl.dtype_bytes), not host.dense[layer], terms)
    before_routing_s = attn_s + link_s + sync_s
    pre_s = max(dense_s - ffn_s, 0.0) + before_routing_s
    if not cuda and hw.elementwise_gbps > 0:    # the CPU runs these passes between its GEMMs
        elementwise_bytes = shape.tokens * spec.elementwise_elems_per_token(layer) * wl.dtype_bytes
        elementwise_s = elementwise_bytes / (hw.elementwise_gbps * GB)
        terms["elementwise"] += elementwise_s
        pre_s += elementwise_s
    if not cuda and not (experts.streamed or dense_copy_s):
        layer_s = pre_s + ffn_s + experts.compute_s
        return _Pass(layer_s, layer_s, terms)
    layer_s = pre_s + _streamed_tail_s(plan, experts, dense_copy_s, ffn_s, resident.dense[layer])
    if not cuda:     # disk tier: the reads could at best hide behind all of the compute
        return _Pass(layer_s, max(experts.copy_s + dense_copy_s, pre_s + ffn_s + experts.compute_s), terms)
    cpu_side = attn_s if shape.phase == "decode" else 0.0
    gpu_side = dense_s + experts.compute_s + (attn_s - cpu_side)
    ideal_s = max(experts.copy_s + dense_copy_s + link_s, cpu_side, gpu_side)
    return _Pass(layer_s, ideal_s, terms)


def _pass_cost(spec: ModelSpec, hw: Hardware, plan, wl: JobShape, shape: _PassShape, resident: ResidentSet,
               host: ResidentSet) -> _Pass:
    """All layers plus the step's own work (embedding, lm_head, sampling, the first dense copy)."""
    out = _Pass()
    memo: dict[tuple, _Pass] = {}
    for layer in range(spec.num_layers):
        key = (spec.moe_layer_mask[layer], resident.dense[layer], resident.experts[layer], host.dense[layer],
               host.experts[layer], spec.sliding_window(layer))
        if key not in memo:
            memo[key] = _layer_cost(spec, hw, plan, wl, shape, layer, resident, host)
        out.add(memo[key])
    terms = dict.fromkeys(TERMS, 0.0)
    lm_bytes = spec.vocab_size * spec.hidden_size * wl.dtype_bytes
    step_s = _gemm(hw, wl.dtype, shape.seqs, spec.hidden_size, spec.vocab_size, lm_bytes, terms)
    logits_s = shape.seqs * spec.vocab_size * 12 / (hw.weight_read_gbps * GB)   # softmax/argmax passes
    terms["memory"] += logits_s
    fixed_s = OPS_PER_STEP * hw.op_overhead_s + hw.seq_overhead_s * shape.seqs
    terms["overhead"] += fixed_s
    first_copy_s = 0.0
    if not resident.dense[0]:   # nothing to hide the first layer's copy behind
        first_copy_s = _charge_copy(hw, dense_group_bytes(spec, 0, wl.dtype_bytes), not host.dense[0], terms)
    step_s += logits_s + fixed_s + first_copy_s
    out.add(_Pass(step_s, step_s, terms))
    return out


# ---- the whole run ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """Predicted times and rates of one job under one plan.

    Tokens per second follow moegen.bench.metrics: prefill = prompt tokens / prefill time; decode =
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

    def summary(self) -> dict:
        return asdict(self)


def _bound(terms: Mapping[str, float]) -> str:
    return max(TERMS, key=lambda t: terms.get(t, 0.0))


def _check_plan(spec: ModelSpec, hw: Hardware, plan) -> None:
    device = str(plan.device).partition(":")[0]
    if device != hw.device:
        raise PlanError(f"plan is for device {plan.device!r} but the hardware constants describe {hw.device!r}")
    if plan.max_batch < 1:
        raise PlanError(f"max_batch must be >= 1, got {plan.max_batch}")
    if device == "cuda" and plan.num_buffers < MIN_NUM_BUFFERS:
        raise PlanError(f"num_buffers must be >= {MIN_NUM_BUFFERS} with streaming, got {plan.num_buffers}")
    if device == "cpu" and plan.resident_bytes is not None and hw.disk_read_gbps <= 0:
        raise PlanError("a CPU plan with weights streamed from disk (resident_bytes set) needs the disk's read "
                        "bandwidth: `moegen probe --disk CHECKPOINT_DIR`, or --hw disk_read_gbps=N")


def predict(spec: ModelSpec, hw: Hardware, plan, job: JobShape) -> Prediction:
    """Predicted times for `job` under `plan` (a moegen.planner.plan.Plan or anything with
    its fields). Sequences run in waves of G = plan.max_batch: each wave's prompts are prefilled in
    passes of max_prefill_tokens // prefill_len prompts (the budget counts the tokens computed),
    then gen_len - 1 decode steps in lockstep
    (equal lengths and no early stop, so the engine's waves are exactly these)."""
    _check_plan(spec, hw, plan)
    wl, db = job, job.dtype_bytes
    # on the CPU resident_bytes is what host memory holds of the weights (None: all; else the disk tier)
    resident = resident_set(spec, plan.resident_bytes, db)
    # on a GPU with the disk tier, what host memory holds (the rest is read from the files)
    host = resident_set(spec, getattr(plan, "host_resident_bytes", None) if hw.device == "cuda" else None, db)
    G = max(1, min(plan.max_batch, wl.num_sequences))
    P, Pc, steps = wl.prompt_len, wl.prefill_len, wl.gen_len - 1
    per_pass = max(1, min(G, plan.max_prefill_tokens // Pc))     # the budget counts computed tokens
    # the computed tokens attend over the whole prompt, the shared part included
    core_prefill = spec.prefill_flops(P, P - Pc) - Pc * spec.context_free_flops() - spec.lm_head_flops()
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
                shape = _PassShape("prefill", seqs * Pc, seqs, 0.0, seqs * core_prefill)
            else:
                shape = _PassShape("decode", seqs, seqs, seqs * kv_step, seqs * core_step)
            cache[phase, seqs] = _pass_cost(spec, hw, plan, wl, shape, resident, host)
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
        resident_fraction=resident.fraction(spec, db))
