"""Mixtral: GQA attention, softmax top-k router (always renormalised, float32 weights)."""
from moegen.layers.moe import SparseMoE
from moegen.layers.router import SoftmaxTopKRouter
from moegen.layers.rotary import RotaryEmbedding
from moegen.models.common import activation, assemble, gqa, head_dim
from moegen.models.model import DecoderLayer

EXPERT_NAMES = ("w1", "w3", "w2")   # gate, up, down on disk
SHAPE_FIELDS = ("num_local_experts", "num_experts_per_tok", "intermediate_size")


def build(cfg):
    rope = RotaryEmbedding(cfg, head_dim(cfg))
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.block_sparse_moe"
        router = SoftmaxTopKRouter(f"{p}.gate", cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok,
                                   renormalize=True, weights_in_fp32=True)
        moe = SparseMoE(p, cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, router, act=activation(cfg))
        attn = gqa(cfg, i, rope, sliding_window=cfg.sliding_window or 0)
        layers.append(DecoderLayer(i, attn, moe, cfg.rms_norm_eps))
    return assemble(cfg, layers)
