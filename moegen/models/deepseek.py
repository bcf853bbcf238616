"""DeepSeek-V2 and -V3: MLA attention (interleaved rope, YaRN softmax-scale correction), shared
experts, first k layers dense. Routers: V3 grouped sigmoid with correction bias and scaling;
V2 float32 softmax, greedy or group-limited top-k, scaled."""
import math

from moegen.errors import ConfigError
from moegen.layers.mla import MLAAttention
from moegen.layers.mlp import DenseMLP
from moegen.layers.moe import SparseMoE
from moegen.layers.router import GreedySoftmaxRouter, GroupedSigmoidRouter
from moegen.layers.rotary import RotaryEmbedding
from moegen.models.common import activation, assemble
from moegen.models.model import DecoderLayer

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
SHAPE_FIELDS = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def softmax_scale(cfg) -> float:
    """qk_dim^-0.5, times mscale^2 when YaRN's mscale_all_dim asks for it (as DeepSeek does)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    params = cfg.rope_parameters or {}
    factor, mscale_all_dim = params.get("factor", 1.0), params.get("mscale_all_dim", 0)
    if params.get("rope_type", "default") != "default" and mscale_all_dim and factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def attention(cfg, i: int, rope) -> MLAAttention:
    return MLAAttention(prefix=f"model.layers.{i}.self_attn", hidden=cfg.hidden_size, n_heads=cfg.num_attention_heads,
                        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_dim=cfg.qk_nope_head_dim,
                        qk_rope_dim=cfg.qk_rope_head_dim, v_dim=cfg.v_head_dim, rope=rope, eps=cfg.rms_norm_eps,
                        scale=softmax_scale(cfg), bias=bool(getattr(cfg, "attention_bias", False)))


def router_for(cfg, prefix: str):
    if cfg.model_type == "deepseek_v2":
        if cfg.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"config.json topk_method={cfg.topk_method!r} is not supported; "
                              "supported: greedy, group_limited_greedy")
        return GreedySoftmaxRouter(prefix, cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok,
                                   cfg.routed_scaling_factor, cfg.n_group or 1, cfg.topk_group or 1,
                                   cfg.topk_method == "group_limited_greedy")
    return GroupedSigmoidRouter(prefix, cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok,
                                cfg.n_group, cfg.topk_group, bool(cfg.norm_topk_prob), cfg.routed_scaling_factor)


def is_sparse(cfg, i: int) -> bool:
    """transformers' rule: every layer from first_k_dense_replace on is MoE. moe_layer_freq, which
    DeepSeek's own hub code also tests (i % freq == 0), is not read there, so not here either;
    every published checkpoint has moe_layer_freq 1, where the two rules agree."""
    return i >= cfg.first_k_dense_replace


def ffn(cfg, i: int, act: str):
    p = f"model.layers.{i}.mlp"
    if not is_sparse(cfg, i):
        return DenseMLP(p, cfg.hidden_size, cfg.intermediate_size, act)
    router = router_for(cfg, f"{p}.gate")
    shared = DenseMLP(f"{p}.shared_experts", cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, act) \
        if cfg.n_shared_experts else None
    return SparseMoE(p, cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, router, shared=shared, act=act)


def build(cfg):
    # V2 rotates interleaved pairs (as complex numbers); V3 does when rope_interleave is set
    interleaved = cfg.model_type == "deepseek_v2" or bool(getattr(cfg, "rope_interleave", True))
    rope = RotaryEmbedding(cfg, cfg.qk_rope_head_dim, interleaved=interleaved, fp32=cfg.model_type == "deepseek_v2")
    act = activation(cfg)
    layers = [DecoderLayer(i, attention(cfg, i, rope), ffn(cfg, i, act), cfg.rms_norm_eps)
              for i in range(cfg.num_hidden_layers)]
    return assemble(cfg, layers)
