"""The probe's measurements, one rate each (moegen.planner.probe runs them all and caches the
result): GEMM FLOP/s (peak and sustained), host and device memory bandwidth, decode and prompt
attention, elementwise passes, dequantization and the fused routed-experts kernel.

Rates are best-of-N (the least time seen); GB means 1e9 bytes; a copy's bandwidth counts the bytes
read plus the bytes written (STREAM's convention).
"""
from __future__ import annotations

import importlib
import logging
import math
import time
from typing import Callable

import torch

from moegen.errors import ConfigError
from moegen.layers.linear import linear, pack_weight, packing_supported
from moegen.layers.quantized import (DEQUANT_CHUNK_BYTES, DEVICE_DEQUANT_CHUNK_BYTES, SCRATCH, map_tensors,
                                     quantize_fp8, quantize_int)
from moegen.planner.hardware import INT8_COMPUTE

log = logging.getLogger("moegen")

GEMM_DTYPES = ("float32", "bfloat16", "float16")
# (tokens, in_features, out_features): an expert's up/gate GEMM at small (Qwen/OLMoE-sized,
# H=1024 -> 3584) and Mixtral-sized (4096 -> 14336) widths, over the token counts one expert
# sees under module batching.
# Decode gives each expert few tokens (G * top_k / E), so small token counts are measured too:
# the cost model interpolates between rows and must not extrapolate down from 256.
GEMM_SHAPES = {
    "cpu": [(16, 1024, 3584), (32, 1024, 3584), (64, 1024, 3584), (128, 1024, 3584),
            (256, 1024, 3584), (512, 1024, 3584), (1024, 1024, 3584), (2048, 1024, 3584),
            (64, 4096, 14336), (256, 4096, 14336)],
    "cuda": [(32, 1024, 3584), (128, 1024, 3584), (256, 1024, 3584), (2048, 1024, 3584), (8192, 1024, 3584),
             (256, 4096, 14336), (1024, 4096, 14336), (4096, 4096, 14336)],
}
QUICK_GEMM_SHAPES = {"cpu": [(256, 1024, 3584)], "cuda": [(256, 1024, 3584), (2048, 4096, 14336)]}
CALIBRATION_SHAPE = (64, 1024, 1024)
BUDGET_S = 20.0          # stop adding GEMM shapes once the probe has run this long
# Mixtral-shaped decode attention: 32 query heads over 8 KV heads of dim 128, 16-token pages.
ATTENTION_SHAPE = dict(n_heads=32, n_kv_heads=8, head_dim=128, block_size=16)
# Keyed by quick. Quick mode is for tests and smoke runs; its smaller KV may sit partly in cache.
ATTENTION_BATCH = {False: dict(seqs=32, ctx=1024), True: dict(seqs=16, ctx=512)}
# Mixtral-shaped prompts for the prefill attention rate (one causal SDPA per prompt, as the engine).
PREFILL_ATTENTION = {False: dict(seqs=8, prompt_len=256), True: dict(seqs=4, prompt_len=128)}
# Rows of a SwiGLU activation (gate|up of width 2 * 3584) for the elementwise bandwidth.
ELEMENTWISE_ROWS = {False: 2048, True: 512}
# Distinct weights a sustained GEMM rate cycles through: together past the L3 cache, as a pass over
# a layer's experts reads them from memory.
SUSTAINED_WEIGHT_BYTES = 64 << 20
HOST_COPY_BYTES = 256 << 20      # well past any L3 cache (quick mode too), or we would time the cache
DEVICE_COPY_BYTES = {False: 1 << 30, True: 256 << 20}


# ---- timing -----------------------------------------------------------------------------------

def _sync_fn(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def best_time_s(fn: Callable[[], object], sync: Callable[[], None], min_total_s: float = 0.2,
                max_iters: int = 20) -> float:
    """Least wall time of one fn() call: one warm-up (allocation, thread pool, kernel selection),
    then at least two timed calls and more until min_total_s is spent."""
    fn()
    sync()
    best_s, spent_s, iters = math.inf, 0.0, 0
    while iters < max_iters and (iters < 2 or spent_s < min_total_s):
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        best_s, spent_s, iters = min(best_s, dt), spent_s + dt, iters + 1
    return best_s


# ---- GEMM -------------------------------------------------------------------------------------

def gemm_path(dtype: torch.dtype, device: str) -> str:
    """How the engine runs a GEMM of this dtype here: on weights it packed at load, or plain."""
    return "packed" if device == "cpu" and packing_supported(dtype) else "plain"


def _gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, device: str, min_total_s: float,
               sustained: bool = False) -> tuple[float, float | None]:
    """(peak, sustained) FLOP/s of x[m, k] times a weight [n, k], the way the engine's `linear`
    runs it. Peak: the fastest call on one cache-warm weight. Sustained (when asked): the median
    over passes through several distinct weights that together exceed the caches, the rate a
    layer's GEMMs keep up in a real pass (what the cost model predicts with)."""
    packed = gemm_path(dtype, device) == "packed"
    count = max(1, min(8, math.ceil(SUSTAINED_WEIGHT_BYTES / (n * k * dtype.itemsize))))
    weights = [torch.randn(n, k, device=device).to(dtype) for _ in range(count if sustained else 1)]
    weights = [pack_weight(w) if packed else w for w in weights]
    x = torch.randn(m, k, device=device).to(dtype)
    sync, flops = _sync_fn(device), 2 * m * k * n
    peak = flops / best_time_s(lambda: linear(x, weights[0]), sync, min_total_s)
    if not sustained:
        return peak, None
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for w in weights:
            linear(x, w)
        sync()
        rounds.append((time.perf_counter() - t0) / len(weights))
    return peak, flops / sorted(rounds)[1]


def _skip_reason(flops: int, rate_flops_per_s: float, max_shape_s: float, deadline: float) -> str:
    predicted_s = flops / rate_flops_per_s
    if predicted_s > max_shape_s:
        return f"predicted {predicted_s:.1f} s per call"
    return "probe time budget spent" if time.perf_counter() + 3 * predicted_s > deadline else ""


def measure_gemm(device: str, dtype_name: str, shapes: list[tuple[int, int, int]], max_shape_s: float,
                 min_total_s: float, deadline: float = math.inf) -> dict:
    """FLOP/s per shape for one dtype, smallest shape first. A small calibration GEMM, then the best
    rate seen so far, predicts each next shape's time, so that a dtype with no fast kernel here
    (fp16 on most CPUs) skips the big shapes instead of blowing the time budget."""
    dtype = getattr(torch, dtype_name)
    try:
        rate, _ = _gemm_rate(*CALIBRATION_SHAPE, dtype, device, min_total_s=0.05)
    except (RuntimeError, TypeError) as exc:
        return {"supported": False, "error": str(exc).splitlines()[0], "shapes": [], "best_flops_per_s": 0.0}
    rows = [dict(zip("mkn", CALIBRATION_SHAPE), flops_per_s=rate, calibration=True)]
    for m, k, n in sorted(shapes, key=lambda s: s[0] * s[1] * s[2]):
        skipped = _skip_reason(2 * m * k * n, rate, max_shape_s, deadline)
        if skipped:
            rows.append({"m": m, "k": k, "n": n, "skipped": skipped})
            continue
        # sustained rates only for the dtypes the engine computes in on this device
        measured, sustained = _gemm_rate(m, k, n, dtype, device, min_total_s, sustained=dtype != torch.float16)
        rows.append({"m": m, "k": k, "n": n, "flops_per_s": measured,
                     **({"sustained_flops_per_s": sustained} if sustained else {})})
        rate = max(rate, measured)
    # the best at expert shapes; the calibration GEMM only when every expert shape was skipped
    measured = [r["flops_per_s"] for r in rows[1:] if "flops_per_s" in r] or [rows[0]["flops_per_s"]]
    return {"supported": True, "path": gemm_path(dtype, device), "shapes": rows, "best_flops_per_s": max(measured)}


# ---- memory bandwidth -------------------------------------------------------------------------

def _copy_gbps(dst: torch.Tensor, src: torch.Tensor, sync: Callable[[], None], counts_both_ways: bool,
               repeat: int = 1, min_total_s: float = 0.2) -> float:
    """GB/s of dst.copy_(src); counts_both_ways when src and dst live in the same memory."""
    def copy():
        for _ in range(repeat):
            dst.copy_(src, non_blocking=True)
    seconds = best_time_s(copy, sync, min_total_s) / repeat
    moved_bytes = src.numel() * src.element_size() * (2 if counts_both_ways else 1)
    return moved_bytes / seconds / 1e9


def measure_host_bandwidth(quick: bool) -> float:
    """Host memory bandwidth (GB/s, read + write) of a large multi-threaded tensor copy."""
    src = torch.ones(HOST_COPY_BYTES, dtype=torch.uint8)   # touched, so page faults are not timed
    dst = torch.zeros_like(src)
    return _copy_gbps(dst, src, lambda: None, counts_both_ways=True, min_total_s=0.1 if quick else 0.3)


def measure_cuda_transfers(quick: bool) -> dict:
    """Pinned host->device and device->host GB/s (one way) and device memory GB/s (read + write)."""
    host = torch.ones(HOST_COPY_BYTES, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    big = torch.ones(DEVICE_COPY_BYTES[quick], dtype=torch.uint8, device="cuda")
    big_dst = torch.empty_like(big)
    sync = torch.cuda.synchronize
    out = {"h2d_pinned_gbps": _copy_gbps(dev, host, sync, counts_both_ways=False),
           "d2h_pinned_gbps": _copy_gbps(host, dev, sync, counts_both_ways=False),
           # several copies per timing: one is under a millisecond, near launch overhead
           "device_mem_bw_gbps": _copy_gbps(big_dst, big, sync, counts_both_ways=True, repeat=10)}
    del host, dev, big, big_dst
    torch.cuda.empty_cache()
    return out


# ---- prompt attention and elementwise passes (CPU) ---------------------------------------------

def measure_prefill_attention(quick: bool) -> dict:
    """Useful FLOP/s of the engine's prompt attention (bf16: the native kernel with AMX or AVX-512 BF16, else SDPA): token i
    scores i + 1 keys, 4 * heads * head_dim FLOPs per key."""
    from moegen.layers.attention import RaggedContext
    shape, batch = ATTENTION_SHAPE, PREFILL_ATTENTION[quick]
    seqs, p, n, kv, d = batch["seqs"], batch["prompt_len"], shape["n_heads"], shape["n_kv_heads"], shape["head_dim"]
    q = torch.randn(seqs * p, n, d).bfloat16()
    k, v = torch.randn(2, seqs * p, kv, d).bfloat16()
    ctx = RaggedContext([p] * seqs)
    seconds = best_time_s(lambda: ctx.attend(0, q, k, v, d ** -0.5), lambda: None, 0.1 if quick else 0.3)
    flops = seqs * 4 * n * d * p * (p + 1) / 2
    return {"dtype": "bfloat16", **batch, "n_heads": n, "n_kv_heads": kv, "head_dim": d,
            "flops_per_s": flops / seconds}


def measure_elementwise(quick: bool) -> float:
    """GB/s (read + write) of one elementwise pass over activations as the engine runs it: the
    SwiGLU activation of an expert's rows (the fused kernel where built), cache-cold."""
    from moegen.layers.mlp import gated_activation
    rows, width = ELEMENTWISE_ROWS[quick], 2 * 3584
    inputs = [torch.randn(rows, width).bfloat16() for _ in range(4)]   # > L3 together: from memory
    seconds = best_time_s(lambda: [gated_activation(x) for x in inputs], lambda: None, 0.1 if quick else 0.3) / len(inputs)
    return rows * width * 3 // 2 * 2 / seconds / 1e9      # read gate|up, write half as much


# ---- dequantization of quantized weights ------------------------------------------------------

# An expert-shaped weight [out, in], quantized in each format the engine runs.
DEQUANT_SHAPE = (3584, 1024)
DEQUANT_FORMATS = {"fp8": quantize_fp8, "int8": lambda w: quantize_int(w, 8), "int4": lambda w: quantize_int(w, 4)}


def measure_dequant(device: str, quick: bool) -> dict:
    """Parameters per second the engine dequantizes into bf16 (its chunked path, chunk sizes as
    the engine's per device), per format: the cost a quantized GEMM pays on top of bf16's."""
    w = torch.randn(*DEQUANT_SHAPE) * 0.02
    out = {}
    for name, make in DEQUANT_FORMATS.items():
        q = map_tensors(make(w), lambda t: t.to(device))
        n, k = q.shape
        step = q.chunk_rows(DEQUANT_CHUNK_BYTES if device == "cpu" else DEVICE_DEQUANT_CHUNK_BYTES)

        def run():
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                q.dequantize_rows(lo, hi, SCRATCH.get((hi - lo, k), torch.bfloat16, device))
        out[name] = n * k / best_time_s(run, _sync_fn(device), 0.05 if quick else 0.2)
    return out


# ---- decode attention -------------------------------------------------------------------------

def torch_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=0):
    """Plain-torch decode attention over a paged cache, for sequences of *equal* context length
    (all the probe needs): gather the pages, then two batched matmuls per KV head group.
    q [S, N, D]; caches [num_blocks, block_size, K, D]; returns [S, N, D]."""
    seqs, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    ctx = int(context_lens[0])
    start = max(ctx - sliding_window, 0) if sliding_window else 0
    k = k_cache[block_tables.long()].flatten(1, 2)[:, start:ctx]            # [S, T, K, D]
    v = v_cache[block_tables.long()].flatten(1, 2)[:, start:ctx]
    qg = q.view(seqs, n_kv, n_heads // n_kv, head_dim)                       # [S, K, G, D]
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale                 # [S, K, G, T]
    probs = scores.float().softmax(-1).to(v.dtype)
    return torch.matmul(probs, v.permute(0, 2, 1, 3)).reshape(seqs, n_heads, -1)


def _decode_attention_impl() -> tuple[Callable, str]:
    """The engine's decode attention if its module imports, else the plain-torch one."""
    try:
        attention = importlib.import_module("moegen.ops.attention")
        which = attention.attention_impl() if hasattr(attention, "attention_impl") else "?"
        return attention.paged_decode_attention, f"moegen.ops.attention ({which})"
    except Exception:   # the module may be absent or fail to build: the probe still measures
        return torch_paged_decode_attention, "torch matmul (probe fallback)"


def _attention_inputs(seqs: int, ctx: int, n_heads: int, n_kv_heads: int, head_dim: int, block_size: int,
                      dtype: torch.dtype) -> tuple:
    blocks_per_seq = -(-ctx // block_size)
    num_blocks = seqs * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, n_kv_heads, head_dim).to(dtype)
    v_cache = torch.randn_like(k_cache)
    # shuffled pages, as a long-running cache hands them out
    block_tables = torch.randperm(num_blocks).to(torch.int32).view(seqs, blocks_per_seq)
    context_lens = torch.full((seqs,), ctx, dtype=torch.int32)
    q = torch.randn(seqs, n_heads, head_dim).to(dtype)
    return q, k_cache, v_cache, block_tables, context_lens, head_dim ** -0.5


def measure_attention(quick: bool) -> dict:
    """KV bytes/s one CPU decode-attention call processes, the engine's decode attention (bf16
    cache, else float32 if the kernel refuses bf16)."""
    fn, impl = _decode_attention_impl()
    batch, shape = ATTENTION_BATCH[quick], ATTENTION_SHAPE
    errors = []
    for dtype in (torch.bfloat16, torch.float32):
        args = _attention_inputs(**batch, **shape, dtype=dtype)
        try:
            seconds = best_time_s(lambda: fn(*args), _sync_fn("cpu"), min_total_s=0.1 if quick else 0.3)
        except (RuntimeError, TypeError, ValueError) as exc:
            errors.append(f"{dtype}: {str(exc).splitlines()[0]}")
            continue
        kv_bytes = batch["seqs"] * batch["ctx"] * 2 * shape["n_kv_heads"] * shape["head_dim"] * args[1].element_size()
        return {"impl": impl, "dtype": str(dtype).removeprefix("torch."), **batch, **shape,
                "kv_bytes_per_s": kv_bytes / seconds, "kv_gbps": kv_bytes / seconds / 1e9,
                "seqs_per_s": batch["seqs"] / seconds}
    return {"impl": impl, "error": "; ".join(errors), "kv_bytes_per_s": 0.0, "kv_gbps": 0.0}


# ---- the fused routed-experts kernel (CPU, bf16) ------------------------------------------------
# (rows per expert, hidden, expert intermediate, experts, top_k): decode (few rows per expert) to
# prefill (thousands), at the fine-grained (Qwen3/OLMoE-like) and the Mixtral-like width.
FUSED_EXPERTS_SHAPES = {False: [(16, 1024, 512, 32, 8), (64, 1024, 512, 32, 8), (256, 1024, 512, 32, 8),
                                (1024, 1024, 512, 32, 8), (64, 1024, 3584, 8, 2), (256, 1024, 3584, 8, 2),
                                (1024, 1024, 3584, 8, 2)],
                        True: [(64, 1024, 512, 16, 4), (256, 1024, 512, 16, 4)]}


# the quantized formats at the shapes that matter most (decode-sized rows), groups of 128
FUSED_QUANTIZED_SHAPES = {False: [(64, 1024, 512, 32, 8), (256, 1024, 512, 32, 8), (64, 1024, 3584, 8, 2),
                                  (256, 1024, 3584, 8, 2)],
                          True: [(64, 1024, 512, 16, 4)]}


def _fused_layer(fmt: str, hidden: int, inter: int, experts: int, g: torch.Generator, pack: bool = True):
    from moegen.layers.quantized import quantize_fp8, quantize_int, tile_codes
    from moegen.ops import experts as fused
    make = {"bfloat16": lambda w: w, "fp8": lambda w: tile_codes(quantize_fp8(w)),
            "int8": lambda w: tile_codes(quantize_int(w, 8)), "int4": lambda w: tile_codes(quantize_int(w, 4))}[fmt]
    gate_ups = [make(torch.randn(2 * inter, hidden, generator=g).mul_(0.02).bfloat16()) for _ in range(experts)]
    downs = [make(torch.randn(hidden, inter, generator=g).mul_(0.02).bfloat16()) for _ in range(experts)]
    return fused.pack_layer(gate_ups, downs, inter) if pack else (gate_ups, downs)


def measure_fused_experts(quick: bool) -> dict:
    """FLOP/s of one MoE layer's routed experts through moegen.ops.experts (what the engine runs for
    bf16 and quantized experts on the CPU by default), by weight format and rows per expert, and of
    the int8 kernel (experts_kernel=int8; format INT8_COMPUTE) where it has its AMX or VNNI path;
    {"isa": None} and no exact rows where the engine does not take it by default (`auto_isa()` is None)."""
    from moegen.ops import experts as fused
    isa = fused.auto_isa()
    try:
        int8_isa = fused.int8_isa()
    except ConfigError as e:        # a bad MOEGEN_EXPERTS_INT8_ISA: the rest is still measured
        log.warning("the int8 experts kernel is not measured: %s", e)
        int8_isa = None
    # the int8 kernel (opt-in) where its AMX or VNNI path runs, whatever the exact kernel's default
    int8 = [(INT8_COMPUTE, shape) for shape in FUSED_EXPERTS_SHAPES[quick]] if int8_isa not in (None, "generic") else []
    exact = [] if isa is None else [("bfloat16", shape) for shape in FUSED_EXPERTS_SHAPES[quick]] + \
        [(fmt, shape) for fmt in ("fp8", "int8", "int4") for shape in FUSED_QUANTIZED_SHAPES[quick]]
    rows = []
    g = torch.Generator().manual_seed(0)
    for fmt, (per_expert, hidden, inter, experts, top_k) in exact + int8:
        if fmt == INT8_COMPUTE:
            gate_ups, downs = _fused_layer("bfloat16", hidden, inter, experts, g, pack=False)
            gate_up, down = fused.pack_layer_int8(lambda e: (gate_ups[e], downs[e]), experts, hidden, inter)
            kernel = fused.moe_experts_int8
        else:
            gate_up, down = _fused_layer(fmt, hidden, inter, experts, g)
            kernel = fused.moe_experts
        tokens = per_expert * experts // top_k
        # every token on top_k consecutive experts: each expert gets exactly per_expert rows
        top_i = (torch.arange(tokens)[:, None] * top_k + torch.arange(top_k)) % experts
        order = torch.sort(top_i.flatten(), stable=True)[1]
        x = torch.randn(tokens, hidden, generator=g).bfloat16()
        w = torch.rand(tokens * top_k, generator=g)
        counts = [per_expert] * experts

        def run():
            kernel(x, order // top_k, w, counts, gate_up, down, inter, top_k)
        seconds = best_time_s(run, lambda: None, min_total_s=0.05 if quick else 0.2)
        flops = 6.0 * tokens * top_k * hidden * inter
        rows.append({"format": fmt, "isa": int8_isa if fmt == INT8_COMPUTE else isa, "rows_per_expert": per_expert,
                     "hidden": hidden, "intermediate": inter, "experts": experts, "top_k": top_k,
                     "seconds": seconds, "flops_per_s": flops / seconds})
    return {"isa": isa, "shapes": rows}
