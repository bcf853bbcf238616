"""DeepSeek multi-head latent attention (MLA).

K/V are stored compressed: the normalised latent c [T, R] and one shared rotated rope key
k_rope [T, Dr]. The plain path expands them through kv_b_proj into per-head K/V; the engine can
run the absorbed form over the latent (see `absorb_query` / `latent_to_value`).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moegen.layers.linear import linear
from moegen.layers.norm import rms_norm
from moegen.layers.rotary import RotaryEmbedding


@dataclass
class MLAAttention:
    prefix: str
    hidden: int
    n_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_dim: int
    rope: RotaryEmbedding
    eps: float
    scale: float
    bias: bool = False           # config.attention_bias: on q_a_proj, kv_a_proj and o_proj

    @property
    def qk_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim

    def weight_shapes(self) -> dict[str, tuple]:
        p, n = self.prefix, self.n_heads
        shapes = {
            f"{p}.kv_a_proj_with_mqa.weight": (self.kv_lora_rank + self.qk_rope_dim, self.hidden),
            f"{p}.kv_a_layernorm.weight": (self.kv_lora_rank,),
            f"{p}.kv_b_proj.weight": (n * (self.qk_nope_dim + self.v_dim), self.kv_lora_rank),
            f"{p}.o_proj.weight": (self.hidden, n * self.v_dim),
        }
        if self.q_lora_rank is None:
            shapes[f"{p}.q_proj.weight"] = (n * self.qk_dim, self.hidden)
        else:
            shapes.update({f"{p}.q_a_proj.weight": (self.q_lora_rank, self.hidden),
                           f"{p}.q_a_layernorm.weight": (self.q_lora_rank,),
                           f"{p}.q_b_proj.weight": (n * self.qk_dim, self.q_lora_rank)})
        if self.bias:
            shapes[f"{p}.kv_a_proj_with_mqa.bias"] = (self.kv_lora_rank + self.qk_rope_dim,)
            shapes[f"{p}.o_proj.bias"] = (self.hidden,)
            if self.q_lora_rank is not None:
                shapes[f"{p}.q_a_proj.bias"] = (self.q_lora_rank,)
        return shapes

    def linear_weight_names(self) -> list[str]:
        """Weights used only as `linear` operands; kv_b_proj is not one (absorbed decode views it)."""
        names = ["q_proj"] if self.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
        return [f"{self.prefix}.{n}.weight" for n in names + ["kv_a_proj_with_mqa", "o_proj"]]

    def project(self, w, x, positions):
        """q_nope [T, N, Dn], q_rope [T, N, Dr] (rotated), latent [T, R], k_rope [T, Dr] (rotated)."""
        p, t = self.prefix, x.shape[0]
        if self.q_lora_rank is None:
            q = linear(x, w[f"{p}.q_proj.weight"])
        else:
            qa = linear(x, w[f"{p}.q_a_proj.weight"], w.get(f"{p}.q_a_proj.bias"))
            q = linear(rms_norm(qa, w[f"{p}.q_a_layernorm.weight"], self.eps), w[f"{p}.q_b_proj.weight"])
        q_nope, q_rope = q.view(t, self.n_heads, self.qk_dim).split([self.qk_nope_dim, self.qk_rope_dim], -1)
        kv = linear(x, w[f"{p}.kv_a_proj_with_mqa.weight"], w.get(f"{p}.kv_a_proj_with_mqa.bias"))
        latent, k_rope = kv.split([self.kv_lora_rank, self.qk_rope_dim], -1)
        latent = rms_norm(latent, w[f"{p}.kv_a_layernorm.weight"], self.eps)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        q_rope = self.rope.apply(q_rope, cos, sin)
        k_rope = self.rope.apply(k_rope[:, None, :], cos, sin)[:, 0]
        return q_nope, q_rope, latent, k_rope

    def expand_qkv(self, w, q_nope, q_rope, latent, k_rope):
        """Per-head q [T, N, Dqk], k [Tk, N, Dqk], v [Tk, N, Dv] from the latent (plain MLA)."""
        kv = F.linear(latent, w[f"{self.prefix}.kv_b_proj.weight"])
        k_nope, v = kv.view(latent.shape[0], self.n_heads, -1).split([self.qk_nope_dim, self.v_dim], -1)
        k = torch.cat([k_nope, k_rope[:, None, :].expand(-1, self.n_heads, -1)], dim=-1)
        return torch.cat([q_nope, q_rope], dim=-1), k, v

    def forward(self, w, x, ctx, layer_idx: int):
        q_nope, q_rope, latent, k_rope = self.project(w, x, ctx.positions)
        out = ctx.attend_mla(layer_idx, self, w, q_nope, q_rope, latent, k_rope)
        return linear(out.reshape(x.shape[0], -1), w[f"{self.prefix}.o_proj.weight"], w.get(f"{self.prefix}.o_proj.bias"))
