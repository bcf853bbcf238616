"""GQA attention (optional qkv bias, per-head or full-width q/k norm, qkv clipping) and the
ragged-batch attention context used by the plain forward.

An attention block computes q/k/v and hands them to an *attention context*, which owns where K/V
live: `RaggedContext` attends within each sequence of a flat ragged batch (reference forward,
prefill); the engine's context writes K/V into its paged host cache and attends over it.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moegen.layers.linear import linear
from moegen.layers.norm import rms_norm
from moegen.layers.rotary import RotaryEmbedding
from moegen.ops.prefill_attention import prefill_attention


def causal_attention(q, k, v, scale: float, sliding_window: int = 0, past: int = 0):
    """One sequence: q [Tq, N, D], k [Tk, K, D], v [Tk, K, Dv] with the Tq queries being the last
    tokens of the Tk keys (past = Tk - Tq). Returns [Tq, N, Dv]. Or B sequences of one length, each
    on its own (q [B, Tq, N, D], k and v [B, Tk, K, D]; returns [B, Tq, N, Dv]): the same values as
    B single calls, as SDPA works on each (sequence, head) apart, with one call's overhead."""
    batched = q.dim() == 4
    if not batched:
        q, k, v = q[None], k[None], v[None]
    tq, tk = q.shape[1], k.shape[1]
    mask = None
    if sliding_window or past:
        qpos = torch.arange(tk - tq, tk, device=q.device)[:, None]
        kpos = torch.arange(tk, device=q.device)[None, :]
        allowed = kpos <= qpos
        if sliding_window:
            allowed &= qpos - kpos < sliding_window
        mask = allowed
    # 4-D inputs reach the fused CPU kernels; 3-D ones fall back to the slow math path
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=mask is None, scale=scale, enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    return out if batched else out[0]


def equal_length_runs(seq_lens: list[int], group: bool = True) -> list[tuple[int, int, int]]:
    """(first token, length, count) for each run of consecutive sequences of one length (group),
    or for each sequence alone."""
    runs, start = [], 0
    for n in seq_lens:
        if group and runs and runs[-1][1] == n:
            runs[-1] = (runs[-1][0], n, runs[-1][2] + 1)
        else:
            runs.append((start, n, 1))
        start += n
    return runs


class RaggedContext:
    """Attention within each sequence of a flat batch of ragged sequences, no cache. bf16 on a CPU
    with AMX or AVX-512 BF16: the whole batch in one native call (moegen.ops.prefill_attention).
    Otherwise SDPA; on the CPU consecutive sequences of one length attend in one call (measured on
    the AMX Xeon: 32 prompts of 128 tokens, Mixtral's heads, 5.6 -> 4.2 ms a layer; the same
    values). Not on a GPU, whose attention kernels may split the keys differently for another
    batch size (other rounding)."""

    def __init__(self, seq_lens: list[int], device="cpu"):
        self.seq_lens = list(seq_lens)
        self.positions = torch.cat([torch.arange(n) for n in self.seq_lens]).to(device)
        self.runs, self.each = equal_length_runs(self.seq_lens), equal_length_runs(self.seq_lens, group=False)

    def attend(self, layer_idx, q, k, v, scale, sliding_window=0):
        out = prefill_attention(q, k, v, self.seq_lens, scale, sliding_window)
        if out is not None:
            return out
        outs = []
        for start, n, count in self.runs if q.device.type == "cpu" else self.each:
            sl = slice(start, start + n * count)
            if count == 1:
                outs.append(causal_attention(q[sl], k[sl], v[sl], scale, sliding_window))
                continue
            q4, k4, v4 = (t[sl].unflatten(0, (count, n)) for t in (q, k, v))
            outs.append(causal_attention(q4, k4, v4, scale, sliding_window).flatten(0, 1))
        return torch.cat(outs)

    def attend_mla(self, layer_idx, attn, w, q_nope, q_rope, latent, k_rope):
        q, k, v = attn.expand_qkv(w, q_nope, q_rope, latent, k_rope)
        return self.attend(layer_idx, q, k, v, attn.scale)


@dataclass
class GQAAttention:
    prefix: str                  # e.g. "model.layers.3.self_attn"
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: RotaryEmbedding
    eps: float
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None   # None, "head" (Qwen3: per head) or "full" (OLMoE: whole projection)
    clip_qkv: float | None = None
    sliding_window: int = 0

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    def weight_shapes(self) -> dict[str, tuple]:
        q, kv, p = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.prefix
        shapes = {f"{p}.q_proj.weight": (q, self.hidden), f"{p}.k_proj.weight": (kv, self.hidden),
                  f"{p}.v_proj.weight": (kv, self.hidden), f"{p}.o_proj.weight": (self.hidden, q)}
        if self.qkv_bias:
            shapes.update({f"{p}.q_proj.bias": (q,), f"{p}.k_proj.bias": (kv,), f"{p}.v_proj.bias": (kv,)})
        if self.o_bias:
            shapes[f"{p}.o_proj.bias"] = (self.hidden,)
        if self.qk_norm == "head":
            shapes.update({f"{p}.q_norm.weight": (self.head_dim,), f"{p}.k_norm.weight": (self.head_dim,)})
        elif self.qk_norm == "full":
            shapes.update({f"{p}.q_norm.weight": (q,), f"{p}.k_norm.weight": (kv,)})
        return shapes

    def linear_weight_names(self) -> list[str]:
        """Weights used only as `linear` operands (the engine may pack them)."""
        return [f"{self.prefix}.{n}_proj.weight" for n in "qkvo"]

    def qkv(self, w, x, positions):
        """Projections, norms, clipping and RoPE: q [T, N, D], k [T, K, D], v [T, K, D]."""
        p, t = self.prefix, x.shape[0]
        q = linear(x, w[f"{p}.q_proj.weight"], w.get(f"{p}.q_proj.bias"))
        k = linear(x, w[f"{p}.k_proj.weight"], w.get(f"{p}.k_proj.bias"))
        v = linear(x, w[f"{p}.v_proj.weight"], w.get(f"{p}.v_proj.bias"))
        if self.qk_norm == "full":
            q, k = rms_norm(q, w[f"{p}.q_norm.weight"], self.eps), rms_norm(k, w[f"{p}.k_norm.weight"], self.eps)
        if self.clip_qkv is not None:
            q, k, v = (z.clamp(-self.clip_qkv, self.clip_qkv) for z in (q, k, v))
        q = q.view(t, self.n_heads, self.head_dim)
        k = k.view(t, self.n_kv_heads, self.head_dim)
        v = v.view(t, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = rms_norm(q, w[f"{p}.q_norm.weight"], self.eps), rms_norm(k, w[f"{p}.k_norm.weight"], self.eps)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        return self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin), v

    def forward(self, w, x, ctx, layer_idx: int):
        q, k, v = self.qkv(w, x, ctx.positions)
        out = ctx.attend(layer_idx, q, k, v, self.scale, self.sliding_window)
        return linear(out.reshape(x.shape[0], -1), w[f"{self.prefix}.o_proj.weight"], w.get(f"{self.prefix}.o_proj.bias"))
