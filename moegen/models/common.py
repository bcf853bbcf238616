"""Pieces several families share when reading a transformers config."""
from moegen.errors import ConfigError
from moegen.layers.attention import GQAAttention
from moegen.layers.mlp import ACTIVATIONS
from moegen.layers.rotary import RotaryEmbedding
from moegen.models.model import MoEModel


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def activation(cfg) -> str:
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ConfigError(f"config.json hidden_act={act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return act


def gqa(cfg, i: int, rope: RotaryEmbedding, **kw) -> GQAAttention:
    return GQAAttention(prefix=f"model.layers.{i}.self_attn", hidden=cfg.hidden_size, n_heads=cfg.num_attention_heads,
                        n_kv_heads=cfg.num_key_value_heads, head_dim=head_dim(cfg), rope=rope, eps=cfg.rms_norm_eps, **kw)


def assemble(cfg, layers) -> MoEModel:
    return MoEModel(config=cfg, layers=layers, hidden=cfg.hidden_size, vocab_size=cfg.vocab_size,
                    eps=cfg.rms_norm_eps, tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))
