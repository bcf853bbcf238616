"""Qwen2-MoE and Qwen3-MoE: GQA (Qwen2: qkv bias; Qwen3: per-head q/k norm), softmax top-k
router (renormalised if norm_topk_prob), dense layers by mlp_only_layers/decoder_sparse_step,
Qwen2's sigmoid-gated shared expert."""
from moegen.layers.mlp import DenseMLP
from moegen.layers.moe import SparseMoE
from moegen.layers.router import SoftmaxTopKRouter
from moegen.layers.rotary import RotaryEmbedding
from moegen.models.common import activation, assemble, gqa, head_dim
from moegen.models.model import DecoderLayer

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
SHAPE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")


def is_sparse(cfg, i: int) -> bool:
    return i not in (cfg.mlp_only_layers or []) and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0


def sliding_window(cfg, i: int) -> int:
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return (cfg.sliding_window or 0) if types[i] == "sliding_attention" else 0
    return (cfg.sliding_window or 0) if getattr(cfg, "use_sliding_window", False) else 0


def ffn(cfg, i: int, act: str, qwen2: bool):
    p = f"model.layers.{i}.mlp"
    if not is_sparse(cfg, i):
        return DenseMLP(p, cfg.hidden_size, cfg.intermediate_size, act)
    router = SoftmaxTopKRouter(f"{p}.gate", cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
                               renormalize=bool(cfg.norm_topk_prob))
    shared = DenseMLP(f"{p}.shared_expert", cfg.hidden_size, cfg.shared_expert_intermediate_size, act) if qwen2 else None
    return SparseMoE(p, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, router,
                     shared=shared, shared_gate=qwen2, act=act)


def build(cfg):
    qwen2 = cfg.model_type == "qwen2_moe"
    rope, act = RotaryEmbedding(cfg, head_dim(cfg)), activation(cfg)
    layers = []
    for i in range(cfg.num_hidden_layers):
        if qwen2:
            attn = gqa(cfg, i, rope, qkv_bias=bool(getattr(cfg, "qkv_bias", True)), sliding_window=sliding_window(cfg, i))
        else:
            bias = bool(getattr(cfg, "attention_bias", False))
            attn = gqa(cfg, i, rope, qkv_bias=bias, o_bias=bias, qk_norm="head", sliding_window=sliding_window(cfg, i))
        layers.append(DecoderLayer(i, attn, ffn(cfg, i, act, qwen2), cfg.rms_norm_eps))
    return assemble(cfg, layers)
