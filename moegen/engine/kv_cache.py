"""Paged KV cache in host memory, and the attention contexts the model's blocks call into.

Layouts (per layer), as the attention ops expect them:
  GQA: k, v  [num_blocks, block_size, n_kv_heads, head_dim]
  MLA: kv    [num_blocks, block_size, kv_lora_rank + rope_dim]   (normalised latent | rotated k_rope)
"""
import torch

from moegen.layers.attention import RaggedContext, causal_attention
from moegen.layers.mla import MLAAttention
from moegen.engine.transfers import HostStaging
from moegen.ops.attention import (gathered_decode_attention, gathered_decode_attention_mla, paged_decode_attention,
                                  paged_decode_attention_mla)


def kv_bytes_per_token(model, dtype: torch.dtype) -> int:
    size = dtype.itemsize
    total = 0
    for layer in model.layers:
        a = layer.attn
        total += (a.kv_lora_rank + a.qk_rope_dim if isinstance(a, MLAAttention) else 2 * a.n_kv_heads * a.head_dim)
    return total * size


class PagedKVCache:
    def __init__(self, model, num_blocks: int, block_size: int, dtype: torch.dtype, device="cpu"):
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.layers = []
        for layer in model.layers:
            a = layer.attn
            if isinstance(a, MLAAttention):
                shapes = [(num_blocks, block_size, a.kv_lora_rank + a.qk_rope_dim)]
            else:
                shapes = [(num_blocks, block_size, a.n_kv_heads, a.head_dim)] * 2
            self.layers.append([torch.zeros(s, dtype=dtype, device=device) for s in shapes])

    @property
    def device(self):
        return self.layers[0][0].device

    def write(self, layer: int, slots: torch.Tensor, *values) -> None:
        """Store per-token values (k and v, or the packed MLA entry) at flat cache slots."""
        for cache, value in zip(self.layers[layer], values):
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots.to(cache.device), value.to(cache.device, cache.dtype))

    def read(self, layer: int, slots: torch.Tensor, device) -> list[torch.Tensor]:
        """The per-token values at flat cache slots (k and v, or the packed MLA entry) on device."""
        slots = slots.to(self.device)
        return [cache.view(-1, *cache.shape[2:]).index_select(0, slots).to(device) for cache in self.layers[layer]]

    def copy_blocks(self, pairs) -> None:
        """Copy whole blocks (source, destination) in every layer: a fork's own partial block."""
        if not pairs:
            return
        src, dst = (torch.tensor(ids, device=self.device) for ids in zip(*pairs))
        for layer in self.layers:
            for cache in layer:
                cache.index_copy_(0, dst, cache.index_select(0, src))


class PrefillContext:
    """Prompts, or the tails of prompts whose leading blocks are cached (past_slots: per sequence
    the flat slots of its cached tokens, or None). Every fresh K/V of the pass is written into the
    cache first; then each tail attends over its cached K/V and its own fresh K/V, so a sequence
    may share blocks that another sequence of the same pass computes. Without pasts this is
    exactly the reference path (attention within each prompt's fresh K/V)."""

    def __init__(self, cache: PagedKVCache, seq_lens: list[int], slots: torch.Tensor, device, past_slots=None):
        self.cache, self.slots, self.device = cache, slots, device
        self.ragged = RaggedContext(seq_lens, device)
        self.pasts = past_slots if past_slots and any(p is not None for p in past_slots) else None
        self.positions = self.ragged.positions
        if self.pasts is not None:
            starts = [0 if p is None else len(p) for p in self.pasts]
            self.positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, seq_lens)]).to(device)

    def _tails(self):
        """(slice of the pass's tokens, cached slots or None) per sequence."""
        start = 0
        for n, past in zip(self.ragged.seq_lens, self.pasts):
            yield slice(start, start + n), past
            start += n

    def attend(self, layer, q, k, v, scale, sliding_window=0):
        self.cache.write(layer, self.slots, k, v)
        if self.pasts is None:
            return self.ragged.attend(layer, q, k, v, scale, sliding_window)
        outs = []
        for sl, past in self._tails():
            if past is None:
                outs.append(causal_attention(q[sl], k[sl], v[sl], scale, sliding_window))
                continue
            if sliding_window:        # the tail's first query sees only the window's last keys
                past = past[max(0, len(past) - sliding_window):]
            past_k, past_v = self.cache.read(layer, past, q.device)
            outs.append(causal_attention(q[sl], torch.cat([past_k, k[sl]]), torch.cat([past_v, v[sl]]), scale,
                                         sliding_window, past=len(past)))
        return torch.cat(outs)

    def attend_mla(self, layer, attn, w, q_nope, q_rope, latent, k_rope):
        self.cache.write(layer, self.slots, torch.cat([latent, k_rope], dim=-1))
        if self.pasts is None:
            return self.ragged.attend_mla(layer, attn, w, q_nope, q_rope, latent, k_rope)
        outs = []
        for sl, past in self._tails():
            lat, rope = latent[sl], k_rope[sl]
            if past is not None:      # the cached latent | k_rope entries, expanded like fresh ones
                entry, = self.cache.read(layer, past, latent.device)
                cached_lat, cached_rope = entry.split([attn.kv_lora_rank, attn.qk_rope_dim], -1)
                lat, rope = torch.cat([cached_lat, lat]), torch.cat([cached_rope, rope])
            q, k, v = attn.expand_qkv(w, q_nope[sl], q_rope[sl], lat, rope)
            outs.append(causal_attention(q, k, v, attn.scale, past=0 if past is None else len(past)))
        return torch.cat(outs)


class DecodeContext:
    """One new token per sequence, attending over its own ragged paged KV, in micro-batches of
    `micro_batch` sequences (0 = all at once). With the KV cache in host memory and the engine on
    a device, each micro-batch's q and new K/V come to the host and its output goes back through
    `staging` (moegen.engine.transfers): the next micro-batch's copies overlap this one's attention.
    With the KV cache on the engine's device, attention runs there (ops.attention's gathered kernels)."""

    def __init__(self, cache: PagedKVCache, block_tables, context_lens, slots, device, micro_batch: int = 0,
                 staging: HostStaging | None = None):
        self.cache, self.slots, self.device = cache, slots, device
        self.block_tables, self.context_lens = block_tables.to(cache.device), context_lens.to(cache.device)
        self.positions = (context_lens.long() - 1).to(device)
        self.staging = staging or HostStaging(device)
        n = len(context_lens)
        step = micro_batch or n
        self.micro_batches = [slice(lo, min(n, lo + step)) for lo in range(0, n, step)]

    def _attend_each(self, layer, kernel, q, news, out_width, *args):
        """Per micro-batch: write its new cache entries (news), then attend over its KV."""
        caches = self.cache.layers[layer]
        mbs, tables, lens = self.micro_batches, self.block_tables, self.context_lens
        if not (self.staging.active and self.cache.device.type == "cpu"):      # q, K/V and cache in one place
            self.cache.write(layer, self.slots, *news)
            q = q.to(caches[0].device, caches[0].dtype)
            return torch.cat([kernel(q[mb], *caches, tables[mb], lens[mb], *args) for mb in mbs]).to(self.device)

        def outs():
            for mb, (hq, *hnew) in zip(mbs, self.staging.to_host([q, *news], mbs)):
                self.cache.write(layer, self.slots[mb], *hnew)
                yield kernel(hq.to(caches[0].dtype), *caches, tables[mb], lens[mb], *args)
        return self.staging.to_device(outs(), mbs, (*q.shape[:2], out_width), caches[0].dtype)

    def _kernels(self):
        return (paged_decode_attention, paged_decode_attention_mla) if self.cache.device.type == "cpu" else \
            (gathered_decode_attention, gathered_decode_attention_mla)

    def attend(self, layer, q, k, v, scale, sliding_window=0):
        out = self._attend_each(layer, self._kernels()[0], q, [k, v], q.shape[-1], scale, sliding_window)
        return out.to(q.dtype)

    def attend_mla(self, layer, attn, w, q_nope, q_rope, latent, k_rope):
        """Absorbed MLA: fold kv_b's key half into the query and its value half into the output,
        so attention runs over the compressed latent without expanding per-head K/V."""
        kv_b = w[f"{attn.prefix}.kv_b_proj.weight"].view(attn.n_heads, attn.qk_nope_dim + attn.v_dim, attn.kv_lora_rank)
        w_uk, w_uv = kv_b[:, :attn.qk_nope_dim], kv_b[:, attn.qk_nope_dim:]
        q = torch.cat([torch.einsum("bnd,ndr->bnr", q_nope, w_uk), q_rope], dim=-1)
        out = self._attend_each(layer, self._kernels()[1], q, [torch.cat([latent, k_rope], dim=-1)], attn.kv_lora_rank,
                                attn.scale, attn.kv_lora_rank)
        return torch.einsum("bnr,nvr->bnv", out.to(q_nope.dtype), w_uv)
