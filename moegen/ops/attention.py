"""Decode attention over the paged KV cache: native kernels with a PyTorch fallback.

Layouts (see csrc/decode_attention.cpp for the kernel):
  GQA: q [S, H, D]; k_cache, v_cache [num_blocks, block_size, KVH, D]; out [S, H, D].
  MLA: q [S, H, R + P]; kv_cache [num_blocks, block_size, R + P]; out [S, H, R] (V = K[:R]).
  block_tables int32 [S, max_blocks]; context_lens int32 [S] (>= 1, current token included).
Token t of sequence s is at cache[block_tables[s, t // block_size], t % block_size]; table
entries past a sequence's last used block are never read.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moegen.ops.build import native_ops

_STORAGE = (torch.float32, torch.bfloat16, torch.float16)
# Upper bound on the elements of one gathered, padded K (or V) batch in the fallback: small
# enough (16 MiB in fp32) for the allocator to recycle buffers instead of faulting in new pages.
_FALLBACK_BUCKET_ELEMS = 1 << 22
# A bucket accepts a sequence while padding wastes at most this fraction of its tokens.
_FALLBACK_MAX_WASTE = 0.2


def attention_impl() -> str:
    """Which implementation runs: e.g. "native-avx512", "native-avx2", "native" or "torch"."""
    ops = native_ops()
    return ops.impl if ops is not None else "torch"


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """One decode step of (grouped-query) attention for every sequence; returns [S, H, D]."""
    ops = native_ops()
    if ops is not None:
        return ops.ops.paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, float(scale), int(sliding_window)
        )
    return paged_decode_attention_torch(
        q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window
    )


def paged_decode_attention_mla(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """One decode step of absorbed MLA (MQA whose V is the latent prefix of K); [S, H, R]."""
    ops = native_ops()
    if ops is not None:
        return ops.ops.paged_decode_attention_mla(
            q, kv_cache, block_tables, context_lens, float(scale), int(kv_lora_rank)
        )
    return paged_decode_attention_mla_torch(q, kv_cache, block_tables, context_lens, scale, kv_lora_rank)


# ---------------------------------------------------------------------------------------------
# Gathered: the same results on any device (a GPU holding the KV cache). Each sequence's blocks are
# gathered into a padded batch [S, L, ...], L = the table's width in tokens, masked past its own
# context; float32 math as the CPU kernels. Memory grows with S x L: called per micro-batch.
# ---------------------------------------------------------------------------------------------


def _gathered(cache, block_tables, context_lens, window: int = 0):
    """(float32 [S, L, ...] of each sequence's cache rows, zero where not attended; mask [S, L])."""
    s, width = block_tables.shape
    rows = cache[block_tables.long()].reshape(s, width * cache.shape[1], *cache.shape[2:]).float()
    pos = torch.arange(rows.shape[1], device=cache.device)[None, :]
    lens = context_lens.long()[:, None]
    valid = (pos < lens) & (pos >= lens - window) if window > 0 else pos < lens
    # stale rows past a context are zeroed, not only masked: NaN * 0 would still be NaN
    return torch.where(valid.view(*valid.shape, *([1] * (rows.dim() - 2))), rows, 0.0), valid


def gathered_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=0):
    """paged_decode_attention where q and the cache are (any device); [S, H, D]."""
    k, valid = _gathered(k_cache, block_tables, context_lens, sliding_window)
    v, _ = _gathered(v_cache, block_tables, context_lens, sliding_window)
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=valid[:, None, None, :], scale=float(scale),
                                         enable_gqa=q.shape[1] != k.shape[2])
    return out.squeeze(2).to(q.dtype)


def gathered_decode_attention_mla(q, kv_cache, block_tables, context_lens, scale, kv_lora_rank):
    """paged_decode_attention_mla where q and the cache are (any device); [S, H, R]."""
    kv, valid = _gathered(kv_cache, block_tables, context_lens)
    scores = torch.matmul(q.float(), kv.transpose(1, 2)) * float(scale)
    probs = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    return torch.matmul(probs, kv[..., :kv_lora_rank]).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# PyTorch fallback: sequences of similar length are bucketed, each bucket's blocks gathered into
# a padded [B, L, ...] batch in one index_select, and attended with SDPA / batched matmul.
# ---------------------------------------------------------------------------------------------


def _check_common(op: str, q, block_tables, context_lens) -> None:
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [num_seqs, n_heads, head_dim], got shape {tuple(q.shape)}")
    if q.dtype not in _STORAGE:
        raise TypeError(f"{op}: storage dtype must be float32, bfloat16 or float16, got {q.dtype}")
    if block_tables.dtype != torch.int32:
        raise TypeError(f"{op}: block_tables must be int32, got {block_tables.dtype}")
    if context_lens.dtype != torch.int32:
        raise TypeError(f"{op}: context_lens must be int32, got {context_lens.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(
            f"{op}: block_tables must be [num_seqs={q.shape[0]}, max_blocks_per_seq], "
            f"got shape {tuple(block_tables.shape)}"
        )
    if context_lens.shape != (q.shape[0],):
        raise ValueError(
            f"{op}: context_lens must be [num_seqs={q.shape[0]}], got shape {tuple(context_lens.shape)}"
        )


def _check_cache(op: str, name: str, cache, q, dims: int) -> None:
    if cache.dim() != dims:
        raise ValueError(f"{op}: {name} must have {dims} dims, got shape {tuple(cache.shape)}")
    if cache.dtype != q.dtype:
        raise TypeError(f"{op}: {name} dtype {cache.dtype} differs from q dtype {q.dtype}")
    if cache.shape[0] == 0 or cache.shape[1] == 0:
        raise ValueError(f"{op}: {name} needs at least one block of one token, got {tuple(cache.shape)}")


def _token_spans(op, context_lens, max_blocks, block_size, window):
    """Per sequence: first attended token and one past the last, as int64 tensors."""
    ends = context_lens.to(torch.int64)
    if ends.numel() and (int(ends.min()) < 1 or int(ends.max()) > max_blocks * block_size):
        raise ValueError(
            f"{op}: context_lens must be in [1, max_blocks_per_seq * block_size = "
            f"{max_blocks * block_size}], got range [{int(ends.min())}, {int(ends.max())}]"
        )
    starts = (ends - window).clamp(min=0) if window > 0 else torch.zeros_like(ends)
    return starts, ends


def _plan_buckets(first_block, n_blocks, row_elems, block_size):
    """Groups sequences (longest first) so that padding stays small and batches bounded."""
    order = torch.argsort(n_blocks, descending=True, stable=True).tolist()
    nb = n_blocks.tolist()
    buckets, current, cap = [], [], 0
    for s in order:
        fits = current and nb[s] >= cap * (1 - _FALLBACK_MAX_WASTE)
        fits = fits and (len(current) + 1) * cap * block_size * row_elems <= _FALLBACK_BUCKET_ELEMS
        if not fits:
            if current:
                buckets.append((current, cap))
            current, cap = [], nb[s]
        current.append(s)
    if current:
        buckets.append((current, cap))
    return buckets


class _Buffers:
    """Flat buffers reused by all buckets of one call: fresh large tensors would fault their
    pages in again for every bucket."""

    def __init__(self):
        self._bufs: dict[object, torch.Tensor] = {}

    def take(self, key, shape, dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


def _block_ids(op, block_tables, idx, first_block, n_blocks, cap, num_blocks):
    """Blocks first_block .. first_block + cap - 1 of each sequence in idx, flattened; columns
    past a sequence's own blocks repeat its first block (never a stale table entry)."""
    cols = torch.arange(cap, dtype=torch.int64)
    own = cols[None, :] < n_blocks[idx, None]
    table_cols = torch.where(own, first_block[idx, None] + cols[None, :], first_block[idx, None])
    ids = block_tables[idx[:, None], table_cols].to(torch.int64).reshape(-1)
    if bool(((ids < 0) | (ids >= num_blocks)).any()):
        raise ValueError(f"{op}: block_tables has entries outside the cache's {num_blocks} blocks")
    return ids


def _valid_span(idx, first_block, starts, ends, block_size):
    """Per sequence of the bucket, [lo, hi): its attended tokens' positions in the batch."""
    lo = starts[idx] - first_block[idx] * block_size
    return lo.tolist(), (lo + ends[idx] - starts[idx]).tolist()


def _gather_fp32(cache, ids, span, length, bufs: _Buffers, key) -> torch.Tensor:
    """[B, L, ...] fp32 batch of the given blocks with padding rows zeroed. Padding rows may
    hold stale cache data, even NaN, which masking alone would let through (NaN * 0); fp32
    because bf16 scores would keep only ~3 significant digits."""
    lo, hi = span
    gathered = bufs.take((key, "raw"), (ids.numel(), *cache.shape[1:]), cache.dtype)
    torch.index_select(cache, 0, ids, out=gathered)
    gathered = gathered.view(len(lo), length, *cache.shape[2:])
    for b, (first, end) in enumerate(zip(lo, hi)):  # padding is one slice before, one after
        gathered[b, :first].zero_()
        gathered[b, end:].zero_()
    if cache.dtype == torch.float32:
        return gathered
    return bufs.take((key, "fp32"), gathered.shape, torch.float32).copy_(gathered)


def _span_mask(span, length) -> torch.Tensor:
    lo, hi = (torch.tensor(x, dtype=torch.int64)[:, None] for x in span)
    pos = torch.arange(length, dtype=torch.int64)[None, :]
    return (pos >= lo) & (pos < hi)


def paged_decode_attention_torch(
    q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=0
) -> torch.Tensor:
    """Pure-PyTorch version of :func:`paged_decode_attention` (same arguments and result)."""
    op = "paged_decode_attention"
    _check_common(op, q, block_tables, context_lens)
    _check_cache(op, "k_cache", k_cache, q, 4)
    _check_cache(op, "v_cache", v_cache, q, 4)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    num_seqs, n_heads, d = q.shape
    _, block_size, n_kv, dc = k_cache.shape
    if d != dc:
        raise ValueError(f"{op}: q head_dim {d} != cache head_dim {dc}")
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"{op}: n_heads {n_heads} must be a multiple of n_kv_heads {n_kv}")
    if sliding_window < 0:
        raise ValueError(f"{op}: sliding_window must be >= 0, got {sliding_window}")

    starts, ends = _token_spans(op, context_lens, block_tables.shape[1], block_size, sliding_window)
    first_block = starts // block_size
    n_blocks = (ends - 1) // block_size - first_block + 1
    out = torch.empty_like(q)
    bufs = _Buffers()
    for seqs, cap in _plan_buckets(first_block, n_blocks, n_kv * d, block_size):
        idx = torch.tensor(seqs, dtype=torch.int64)
        ids = _block_ids(op, block_tables, idx, first_block, n_blocks, cap, k_cache.shape[0])
        span, length = _valid_span(idx, first_block, starts, ends, block_size), cap * block_size
        attn = F.scaled_dot_product_attention(
            q.index_select(0, idx).float().unsqueeze(2),  # [B, H, 1, D]
            _gather_fp32(k_cache, ids, span, length, bufs, "k").transpose(1, 2),  # [B, KVH, L, D]
            _gather_fp32(v_cache, ids, span, length, bufs, "v").transpose(1, 2),
            attn_mask=_span_mask(span, length)[:, None, None, :],
            scale=float(scale),
            enable_gqa=n_heads != n_kv,
        )
        out.index_copy_(0, idx, attn.squeeze(2).to(q.dtype))
    return out


def paged_decode_attention_mla_torch(
    q, kv_cache, block_tables, context_lens, scale, kv_lora_rank
) -> torch.Tensor:
    """Pure-PyTorch version of :func:`paged_decode_attention_mla` (same arguments and result)."""
    op = "paged_decode_attention_mla"
    _check_common(op, q, block_tables, context_lens)
    _check_cache(op, "kv_cache", kv_cache, q, 3)
    num_seqs, n_heads, width = q.shape
    _, block_size, cache_width = kv_cache.shape
    if width != cache_width:
        raise ValueError(f"{op}: q width {width} != kv_cache width (kv_lora_rank + rope_dim) {cache_width}")
    if not 0 < kv_lora_rank <= width:
        raise ValueError(f"{op}: kv_lora_rank {kv_lora_rank} must be in [1, {width}]")

    starts, ends = _token_spans(op, context_lens, block_tables.shape[1], block_size, 0)
    first_block = starts // block_size
    n_blocks = (ends - 1) // block_size - first_block + 1
    out = torch.empty(num_seqs, n_heads, kv_lora_rank, dtype=q.dtype)
    bufs = _Buffers()
    for seqs, cap in _plan_buckets(first_block, n_blocks, width, block_size):
        idx = torch.tensor(seqs, dtype=torch.int64)
        ids = _block_ids(op, block_tables, idx, first_block, n_blocks, cap, kv_cache.shape[0])
        span, length = _valid_span(idx, first_block, starts, ends, block_size), cap * block_size
        valid = _span_mask(span, length)
        # [B, L, R + P]: one KV head shared by all query heads
        kv = _gather_fp32(kv_cache, ids, span, length, bufs, "kv")
        scores = torch.matmul(q.index_select(0, idx).float(), kv.transpose(1, 2)) * float(scale)
        scores.masked_fill_(~valid[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out.index_copy_(0, idx, torch.matmul(probs, kv[..., :kv_lora_rank]).to(q.dtype))
    return out
