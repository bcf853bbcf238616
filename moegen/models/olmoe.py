"""OLMoE: GQA with q/k RMSNorm over the whole projection and optional qkv clipping; softmax
top-k router (renormalised if norm_topk_prob)."""
from moegen.layers.moe import SparseMoE
from moegen.layers.router import SoftmaxTopKRouter
from moegen.layers.rotary import RotaryEmbedding
from moegen.models.common import activation, assemble, gqa, head_dim
from moegen.models.model import DecoderLayer

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
SHAPE_FIELDS = ("num_experts", "num_experts_per_tok", "intermediate_size")


def build(cfg):
    rope, act = RotaryEmbedding(cfg, head_dim(cfg)), activation(cfg)
    bias = bool(getattr(cfg, "attention_bias", False))
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp"
        router = SoftmaxTopKRouter(f"{p}.gate", cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
                                   renormalize=bool(cfg.norm_topk_prob))
        moe = SparseMoE(p, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, router, act=act)
        attn = gqa(cfg, i, rope, qkv_bias=bias, o_bias=bias, qk_norm="full", clip_qkv=cfg.clip_qkv)
        layers.append(DecoderLayer(i, attn, moe, cfg.rms_norm_eps))
    return assemble(cfg, layers)
