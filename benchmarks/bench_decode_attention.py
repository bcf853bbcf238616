"""Microbenchmark: CPU decode attention over the paged KV cache.

Compares, on a ragged batch with Mixtral's head layout, the native kernel, the PyTorch fallback
and torch's scaled_dot_product_attention on one padded batch (gather/padding timed on its own
and together with the attention). Run:  .venv/bin/python benchmarks/bench_decode_attention.py
"""
from __future__ import annotations

import argparse
import math
import mmap
import os
import time

import torch
import torch.nn.functional as F

from moegen.ops import attention as attn


_KEEP_ALIVE = []  # mmaps backing huge-page tensors


def huge_page_copy(x: torch.Tensor) -> torch.Tensor:
    """Copy of x in memory advised for transparent huge pages (2 MiB): block-scattered reads
    then miss the TLB 512x less often. How an engine would allocate its KV cache."""
    nbytes = x.numel() * x.element_size()
    region = mmap.mmap(-1, nbytes + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % (2 << 20)  # 2 MiB aligned, so whole huge pages back it
    _KEEP_ALIVE.append(region)
    return raw[start : start + nbytes].view(x.dtype).view(x.shape).copy_(x)


def make_batch(num_seqs, mean_len, n_heads, n_kv, head_dim, block_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 2 * mean_len, (num_seqs,), generator=g, dtype=torch.int32)
    n_blocks = (lens + block_size - 1) // block_size
    total = int(n_blocks.sum())
    k_cache = torch.randn(total, block_size, n_kv, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(total, block_size, n_kv, head_dim, generator=g).to(dtype)
    perm = torch.randperm(total, generator=g).to(torch.int32)  # blocks scattered over the cache
    tables = torch.zeros(num_seqs, int(n_blocks.max()), dtype=torch.int32)
    at = 0
    for s, n in enumerate(n_blocks.tolist()):
        tables[s, :n] = perm[at : at + n]
        at += n
    q = torch.randn(num_seqs, n_heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, lens


def time_rounds(fns: dict, rounds: int) -> dict:
    """Best-of-`rounds` wall time (ms) of each callable, the callables interleaved round by
    round so that load from other processes drifts over all of them alike."""
    for fn in fns.values():
        fn()  # warm-up: first-touch page faults, thread pool start, lazy builds
    best = {name: math.inf for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def pad_gather(k_cache, v_cache, tables, lens, compute_dtype):
    """One padded batch [B, KVH, Lmax, D] for SDPA: gather blocks, zero the padding, cast."""
    block_size = k_cache.shape[1]
    num_seqs, max_blocks = tables.shape
    ids = tables.reshape(-1).long()
    out = []
    valid = torch.arange(max_blocks * block_size)[None, :] < lens[:, None].long()
    rows = (~valid).nonzero(as_tuple=True)
    for cache in (k_cache, v_cache):
        x = cache.index_select(0, ids).view(num_seqs, max_blocks * block_size, *cache.shape[2:])
        x[rows] = 0
        out.append(x.to(compute_dtype).transpose(1, 2))
    return out[0], out[1], valid[:, None, None, :]


def sdpa_padded(q, k, v, mask, scale, gqa_mode, compute_dtype):
    qc = q.to(compute_dtype).unsqueeze(2)
    if gqa_mode == "repeat":
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    o = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa_mode == "gqa")
    return o.squeeze(2).to(q.dtype)


HOT = "native, K/V cache-resident (compute bound)"


def bench_dtype(dtype, args):
    q, kc, vc, tables, lens = make_batch(
        args.seqs, args.mean_len, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype, args.seed
    )
    if args.thp:
        kc, vc = huge_page_copy(kc), huge_page_copy(vc)
    scale = 1.0 / math.sqrt(args.head_dim)
    native = attn.attention_impl() != "torch"
    fns = {}
    if native:
        fns["native"] = lambda: attn.paged_decode_attention(q, kc, vc, tables, lens, scale)
        # Same work with every table pointing into 8 blocks: K/V stay in cache, so this is the
        # compute-bound time; the gap to "native" is what memory costs.
        hot = tables % 8
        fns[HOT] = lambda: attn.paged_decode_attention(q, kc, vc, hot, lens, scale)
    fns["torch fallback (bucketed)"] = lambda: attn.paged_decode_attention_torch(q, kc, vc, tables, lens, scale)
    rows = {name: (None, ms) for name, ms in time_rounds(fns, args.repeats).items()}
    # SDPA on one padded batch: every compute dtype and GQA mode, the fastest counts as "best".
    for cdt in dict.fromkeys((dtype, torch.float32)):
        pad_ms = time_rounds({"pad": lambda: pad_gather(kc, vc, tables, lens, cdt)}, args.repeats)["pad"]
        k, v, mask = pad_gather(kc, vc, tables, lens, cdt)
        modes = {m: (lambda m=m: sdpa_padded(q, k, v, mask, scale, m, cdt)) for m in ("gqa", "repeat")}
        for mode, ms in time_rounds(modes, max(1, args.repeats // 2)).items():
            rows[f"sdpa padded ({mode}, {str(cdt).removeprefix('torch.')} math)"] = (pad_ms, ms)
        del k, v, mask

    kv_bytes = int(lens.sum()) * args.kv_heads * args.head_dim * 2 * kc.element_size()
    best_name, best = min(
        ((n, (p or 0) + c) for n, (p, c) in rows.items() if not n.startswith("native")),
        key=lambda x: x[1],
    )
    best_sdpa_compute = min(c for n, (p, c) in rows.items() if n.startswith("sdpa"))
    print(f"\n== {str(dtype).removeprefix('torch.')}: {args.seqs} seqs, mean len {float(lens.float().mean()):.0f} "
          f"(max {int(lens.max())}), {args.heads} q heads / {args.kv_heads} kv heads x {args.head_dim}, "
          f"block {args.block_size}, {torch.get_num_threads()} threads, impl {attn.attention_impl()}, "
          f"{'huge-page' if args.thp else '4 KiB-page'} cache, best of {args.repeats} "
          f"(load avg {os.getloadavg()[0]:.1f})")
    print(f"{'path':44s} {'gather ms':>10s} {'attn ms':>10s} {'total ms':>10s} {'eff GB/s':>9s}")
    for name, (pad, comp) in rows.items():
        total = (pad or 0) + comp
        gbs = kv_bytes / (total * 1e-3) / 1e9
        pad_s = f"{pad:10.2f}" if pad is not None else f"{'-':>10s}"
        print(f"{name:44s} {pad_s} {comp:10.2f} {total:10.2f} {gbs:9.1f}")
    if native:
        nat = rows["native"][1]
        print(f"native speed-up vs best PyTorch path [{best_name}]: {best / nat:.1f}x  "
              f"(vs SDPA compute alone on pre-padded KV: {best_sdpa_compute / nat:.1f}x)")
        flops = 4 * int(lens.sum()) * args.heads * args.head_dim  # QK and PV multiply-adds
        print(f"native reads {kv_bytes / 1e6:.0f} MB of K/V: {kv_bytes / (nat * 1e-3) / 1e9:.1f} GB/s, "
              f"{flops / (nat * 1e-3) / 1e9:.0f} GFLOP/s ({flops / (rows[HOT][1] * 1e-3) / 1e9:.0f} "
              f"GFLOP/s cache-resident)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, default=256)
    p.add_argument("--mean-len", type=int, default=512)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (best is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thp", action="store_true", help="K/V caches in transparent huge pages")
    p.add_argument("--dtypes", default="bfloat16,float32")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.dtypes.split(","):
        bench_dtype(getattr(torch, name), args)


if __name__ == "__main__":
    main()
