"""Hardware probe: the measured constants the planner's roofline needs.

Measures, in well under 30 s: GEMM FLOP/s per dtype at the shapes experts run (peak on a
cache-warm weight; sustained through weights read from memory), host memory bandwidth, the
decode-attention rate over a paged KV cache (KV bytes/s) on the CPU, and on the CPU the prompt
attention rate and the bandwidth of an elementwise pass; on CUDA also pinned host<->device and
device memory bandwidth. Results are cached as JSON per machine and
device under $XDG_CACHE_HOME/moegen/ (~/.cache when unset); `refresh=True` measures again.

Rates are best-of-N (the least time seen): the planner wants what the hardware can do, and a
noisy neighbour only ever makes a run slower. GB means 1e9 bytes. A copy's bandwidth counts the
bytes read plus the bytes written (STREAM's convention).
"""
from __future__ import annotations

import datetime
import logging
import importlib
import io
import json
import math
import os
import platform
import re
import socket
import time
from pathlib import Path
from typing import Callable

import torch

from moegen.errors import MoegenError
from moegen.layers.linear import linear, pack_weight, packing_supported
from moegen.layers.quantized import (DEQUANT_CHUNK_BYTES, DEVICE_DEQUANT_CHUNK_BYTES, SCRATCH, map_tensors,
                                     quantize_fp8, quantize_int)

log = logging.getLogger("moegen")
SCHEMA = 6   # 2: CPU GEMMs on packed weights, as the engine runs them; 3: sustained GEMM rates,
             # prompt attention and elementwise bandwidth; 4: dequantization rates of quantized weights;
             # 5: the fused routed-experts kernel's rate by rows per expert (CPU, bf16)
             # 6: the fused kernel on quantized experts too (fp8, int8, int4)
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
    """Useful FLOP/s of the engine's prompt attention (one causal SDPA per prompt, bf16): token i
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


def _fused_layer(fmt: str, hidden: int, inter: int, experts: int, g: torch.Generator):
    from moegen.layers.quantized import quantize_fp8, quantize_int, tile_codes
    from moegen.ops import experts as fused
    make = {"bfloat16": lambda w: w, "fp8": lambda w: tile_codes(quantize_fp8(w)),
            "int8": lambda w: tile_codes(quantize_int(w, 8)), "int4": lambda w: tile_codes(quantize_int(w, 4))}[fmt]
    gate_ups = [make(torch.randn(2 * inter, hidden, generator=g).mul_(0.02).bfloat16()) for _ in range(experts)]
    downs = [make(torch.randn(hidden, inter, generator=g).mul_(0.02).bfloat16()) for _ in range(experts)]
    return fused.pack_layer(gate_ups, downs, inter)


def measure_fused_experts(quick: bool) -> dict:
    """FLOP/s of one MoE layer's routed experts through moegen.ops.experts (what the engine runs for
    bf16 and quantized experts on the CPU by default), by weight format and rows per expert;
    {"isa": None} where the engine does not take it by default (no AMX, or no native kernels)."""
    from moegen.ops import experts as fused
    isa = fused.auto_isa()
    if isa is None:
        return {"isa": None, "shapes": []}
    rows = []
    g = torch.Generator().manual_seed(0)
    cases = [("bfloat16", shape) for shape in FUSED_EXPERTS_SHAPES[quick]] + \
        [(fmt, shape) for fmt in ("fp8", "int8", "int4") for shape in FUSED_QUANTIZED_SHAPES[quick]]
    for fmt, (per_expert, hidden, inter, experts, top_k) in cases:
        gate_up, down = _fused_layer(fmt, hidden, inter, experts, g)
        tokens = per_expert * experts // top_k
        # every token on top_k consecutive experts: each expert gets exactly per_expert rows
        top_i = (torch.arange(tokens)[:, None] * top_k + torch.arange(top_k)) % experts
        order = torch.sort(top_i.flatten(), stable=True)[1]
        x = torch.randn(tokens, hidden, generator=g).bfloat16()
        w = torch.rand(tokens * top_k, generator=g)
        counts = [per_expert] * experts

        def run():
            fused.moe_experts(x, order // top_k, w, counts, gate_up, down, inter, top_k)
        seconds = best_time_s(run, lambda: None, min_total_s=0.05 if quick else 0.2)
        flops = 6.0 * tokens * top_k * hidden * inter
        rows.append({"format": fmt, "rows_per_expert": per_expert, "hidden": hidden, "intermediate": inter,
                     "experts": experts, "top_k": top_k, "seconds": seconds, "flops_per_s": flops / seconds})
    return {"isa": isa, "shapes": rows}


# ---- machine, cache, entry point --------------------------------------------------------------

def _cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_isa() -> dict:
    """What the CPU lists (/proc/cpuinfo) and what moegen's experts kernel runs on it: AMX can be
    listed yet unusable (the kernel then takes AVX-512 BF16), so figures name the latter."""
    try:
        flags = set(re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    except (OSError, AttributeError):
        flags = set()
    from moegen.ops.experts import available_isas
    try:
        isas = available_isas()
    except Exception:       # noqa: BLE001 - a machine report never fails on this
        isas = []
    return {"listed": sorted(flags & {"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512f", "avx2"}),
            "experts_kernel": isas[0] if isas else None}


def machine_info(device: str) -> dict:
    info = {"hostname": socket.gethostname(), "device": device, "torch_version": torch.__version__,
            "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_isa": _cpu_isa(), "host_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory, cuda_version=torch.version.cuda)
    return info


def _parse_device(device: str) -> tuple[str, int]:
    """("cpu", 0) or ("cuda", index) from "cpu", "cuda" or "cuda:N"."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise MoegenError(f"probe: device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MoegenError(f"probe: device {device!r} asked for, but torch.cuda.is_available() is False")
    return kind, int(index or 0)


def measure(device: str = "cpu", quick: bool = False) -> dict:
    """Run every measurement now (no cache). "cuda:N" measures GPU N."""
    kind, index = _parse_device(device)
    if kind == "cpu":
        return {**_measure_all("cpu", quick), "device": device}
    with torch.cuda.device(index):          # plain "cuda" tensors and syncs now mean GPU N
        return {**_measure_all("cuda", quick), "device": device}


def _measure_all(kind: str, quick: bool) -> dict:
    t0 = time.perf_counter()
    shapes = (QUICK_GEMM_SHAPES if quick else GEMM_SHAPES)[kind]
    limits = dict(max_shape_s=0.25, min_total_s=0.05) if quick else dict(max_shape_s=1.0, min_total_s=0.2)
    limits["deadline"] = t0 + BUDGET_S
    gemm = {name: measure_gemm(kind, name, shapes, **limits) for name in GEMM_DTYPES}
    result = {"schema": SCHEMA, **machine_info(kind), "quick": quick,
              "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gemm": gemm,
              "gemm_best_flops_per_s": {name: r["best_flops_per_s"] for name, r in gemm.items()},
              "host_mem_bw_gbps": measure_host_bandwidth(quick),
              "cpu_attention": measure_attention(quick),
              "dequant_params_per_s": measure_dequant(kind, quick)}
    if kind == "cpu":
        result["cpu_prefill_attention"] = measure_prefill_attention(quick)
        result["elementwise_gbps"] = measure_elementwise(quick)
        result["fused_experts"] = measure_fused_experts(quick)
    if kind == "cuda":
        result.update(measure_cuda_transfers(quick))
    result["probe_s"] = time.perf_counter() - t0
    return result


def default_cache_path(device: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"probe-{socket.gethostname()}-{device}")
    return root / "moegen" / f"{name}.json"


def _load_cached(path: Path, device: str, quick: bool) -> dict | None:
    """The cached result if it still describes this machine and is at least as thorough."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not _usable(cached):
        log.warning("probe cache %s does not hold a probe result of schema %d; measuring again", path, SCHEMA)
        return None
    same = cached.get("device") == device and cached.get("torch_version") == torch.__version__
    return cached if same and (quick or not cached.get("quick", True)) else None


def _usable(cached) -> bool:
    """A cache file of this schema whose fields the planner can read (a hand-edited or foreign
    JSON file such as [] or {"gemm": null} is measured again, not a crash on every run)."""
    from moegen.planner.hardware import Hardware
    if not isinstance(cached, dict) or cached.get("schema") != SCHEMA or not isinstance(cached.get("quick"), bool):
        return False
    try:
        Hardware.from_probe(cached)
    except (MoegenError, TypeError, ValueError, KeyError, AttributeError):
        return False
    return True


def _save(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
    os.replace(tmp, path)        # atomic: a concurrent reader never sees half a file


def probe(device: str = "cpu", refresh: bool = False, cache_path: str | Path | None = None,
          quick: bool = False) -> dict:
    """Measured hardware constants, from the per-machine cache unless refresh (or the cache is
    stale: another torch, or a quick result when a full one is asked for). The result carries
    "cached" (whether it came from the file) and "cache_path"."""
    path = Path(cache_path) if cache_path else default_cache_path(device)
    cached = None if refresh else _load_cached(path, device, quick)
    if cached is not None:
        return {**cached, "cached": True, "cache_path": str(path)}
    result = measure(device, quick)
    _save(path, result)
    return {**result, "cached": False, "cache_path": str(path)}


# ---- printing ---------------------------------------------------------------------------------

def _si(value: float | None, unit: str) -> str:
    if not value:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def _gemm_rows(result: dict) -> list[tuple[str, str, str]]:
    rows = []
    for name, r in result.get("gemm", {}).items():
        if not r.get("supported"):
            rows.append((f"GEMM {name}", "unsupported", r.get("error", "")))
            continue
        for s in r["shapes"]:
            shape = f"[{s['m']}, {s['k']}] x [{s['k']}, {s['n']}]"
            note = "calibration" if s.get("calibration") else s.get("skipped", "")
            if s.get("sustained_flops_per_s"):
                note = f"sustained {_si(s['sustained_flops_per_s'], 'FLOP/s')} (weights from memory)"
            rows.append((f"GEMM {name} {shape}", _si(s.get("flops_per_s"), "FLOP/s"), note))
        rows.append((f"GEMM {name} best", _si(r["best_flops_per_s"], "FLOP/s"), ""))
    return rows


def _attention_row(label: str, a: dict) -> tuple[str, str, str]:
    if a.get("error"):
        return label, "-", a["error"]
    note = f"{a['impl']}, {a['dtype']}, {a['seqs']} seqs x {a['ctx']} ctx, {a['n_heads']}/{a['n_kv_heads']} heads"
    return label, f"{a['kv_gbps']:.2f} GB/s of KV", note


def format_probe(result: dict) -> str:
    """A readable table of a probe result."""
    from rich.console import Console
    from rich.table import Table

    where = result.get("gpu_name") or result.get("cpu_model", "?")
    title = (f"moegen probe: {result.get('hostname')} / {result.get('device')} ({where}), "
             f"torch {result.get('torch_version')}, {result.get('torch_threads')} threads"
             f"{', cached' if result.get('cached') else ''}")
    table = Table(title=title, title_justify="left")
    for column in ("measure", "rate", "note"):
        table.add_column(column)
    for row in _gemm_rows(result):
        table.add_row(*row)
    table.add_row("host memory copy", f"{result.get('host_mem_bw_gbps', 0):.1f} GB/s", "read + write")
    for key, label in (("h2d_pinned_gbps", "host -> device (pinned)"), ("d2h_pinned_gbps", "device -> host (pinned)"),
                       ("device_mem_bw_gbps", "device memory copy")):
        if key in result:
            table.add_row(label, f"{result[key]:.1f} GB/s", "")
    table.add_row(*_attention_row("CPU decode attention", result.get("cpu_attention", {})))
    if "cpu_prefill_attention" in result:
        a = result["cpu_prefill_attention"]
        table.add_row("CPU prompt attention", _si(a["flops_per_s"], "FLOP/s"),
                      f"causal, {a['seqs']} prompts x {a['prompt_len']}, {a['n_heads']}/{a['n_kv_heads']} heads")
    experts = result.get("fused_experts") or {}
    for r in experts.get("shapes", ()):
        table.add_row(f"fused experts {r.get('format', 'bfloat16')} {r['rows_per_expert']} rows/expert, "
                      f"{r['experts']} x [{r['hidden']}, {r['intermediate']}]", _si(r["flops_per_s"], "FLOP/s"),
                      experts.get("isa") or "")
    if "elementwise_gbps" in result:
        table.add_row("CPU elementwise pass", f"{result['elementwise_gbps']:.1f} GB/s", "SwiGLU activation, read + write")
    if "disk_read" in result:
        d = result["disk_read"]
        table.add_row("disk read", f"{d['gbps']:.2f} GB/s", f"{'O_DIRECT' if d['direct'] else 'page cache dropped'}, "
                      f"{d['bytes'] >> 20} MiB of {d['path']}")
    for fmt, rate in (result.get("dequant_params_per_s") or {}).items():
        table.add_row(f"dequantize {fmt} -> bf16", _si(rate, "param/s"), f"[{DEQUANT_SHAPE[0]}, {DEQUANT_SHAPE[1]}] weight")
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(table)
    return out.getvalue()
