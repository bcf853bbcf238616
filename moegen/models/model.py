"""The decoder-only MoE model assembled from shared blocks, and its plain full-sequence forward.

Weights are a flat mapping of checkpoint-style names -> tensors (`weights`); blocks read what they
need from it, so the engine can substitute streamed device copies per module.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moegen.layers.attention import RaggedContext
from moegen.layers.linear import linear
from moegen.layers.norm import rms_norm


@dataclass
class DecoderLayer:
    index: int
    attn: object                 # GQAAttention | MLAAttention
    ffn: object                  # SparseMoE | DenseMLP
    eps: float

    @property
    def prefix(self) -> str:
        return f"model.layers.{self.index}"

    @property
    def is_moe(self) -> bool:
        return hasattr(self.ffn, "router")

    def weight_shapes(self):
        p, h = self.prefix, self.attn.hidden
        return {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                **self.attn.weight_shapes(), **self.ffn.weight_shapes()}

    def linear_weight_names(self) -> list[str]:
        return self.attn.linear_weight_names() + self.ffn.linear_weight_names()

    def forward(self, w, x, ctx, ffn=None):
        """Pre-norm residual block. `ffn(w, h)` replaces the feed-forward call (the engine's
        streamed expert path); by default it is this layer's own."""
        h = x + self.attn.forward(w, rms_norm(x, w[f"{self.prefix}.input_layernorm.weight"], self.eps), ctx, self.index)
        h_ffn = rms_norm(h, w[f"{self.prefix}.post_attention_layernorm.weight"], self.eps)
        return h + (ffn or self.ffn.forward)(w, h_ffn)


@dataclass
class MoEModel:
    config: object               # the transformers config
    layers: list[DecoderLayer]
    hidden: int
    vocab_size: int
    eps: float
    tie_word_embeddings: bool = False
    weights: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    # moegen.loader.Checkpoint it was opened from: weights still skeletons (meta) are read from there
    checkpoint: object = None

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def lm_head_name(self) -> str:
        return "model.embed_tokens.weight" if self.tie_word_embeddings else "lm_head.weight"

    def weight_shapes(self) -> dict[str, tuple]:
        shapes = {"model.embed_tokens.weight": (self.vocab_size, self.hidden), "model.norm.weight": (self.hidden,)}
        for layer in self.layers:
            shapes.update(layer.weight_shapes())
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden)
        return shapes

    def linear_weight_names(self) -> list[str]:
        """Weights used only as `linear` operands, which the engine may pack for the CPU GEMM
        (the tied embedding is also a lookup table, so it stays plain)."""
        names = [n for layer in self.layers for n in layer.linear_weight_names()]
        return names + ([] if self.tie_word_embeddings else ["lm_head.weight"])

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.weights.values())

    def embed(self, token_ids: torch.Tensor, w=None) -> torch.Tensor:
        return F.embedding(token_ids, (w or self.weights)["model.embed_tokens.weight"])

    def logits(self, x: torch.Tensor, w=None) -> torch.Tensor:
        w = w or self.weights
        return linear(rms_norm(x, w["model.norm.weight"], self.eps), w[self.lm_head_name])

    @torch.inference_mode()
    def forward(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Reference forward over a ragged batch: one logits tensor [L_i, V] per sequence."""
        lens = [len(s) for s in sequences]
        x = self.embed(torch.tensor([t for s in sequences for t in s], dtype=torch.long))
        ctx = RaggedContext(lens)
        for layer in self.layers:
            x = layer.forward(self.weights, x, ctx)
        return list(self.logits(x).split(lens))

    @torch.inference_mode()
    def forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Forward over a padded batch [B, L] (left or right padding; mask 1 = real token).
        Positions count from each row's first real token. Padding rows of the result are zero."""
        mask = attention_mask.bool()
        seqs = [row[m].tolist() for row, m in zip(input_ids, mask)]
        out = torch.zeros(*input_ids.shape, self.vocab_size, dtype=self.dtype)
        for b, logits in enumerate(self.forward(seqs)):
            out[b, mask[b]] = logits
        return out
