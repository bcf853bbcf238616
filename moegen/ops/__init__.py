"""Native CPU kernels (built on first use, see build.py) and their PyTorch fallbacks."""
from moegen.ops.attention import (
    attention_impl,
    paged_decode_attention,
    paged_decode_attention_mla,
    paged_decode_attention_mla_torch,
    paged_decode_attention_torch,
)
from moegen.ops.build import build_ops

__all__ = [
    "attention_impl",
    "build_ops",
    "paged_decode_attention",
    "paged_decode_attention_mla",
    "paged_decode_attention_mla_torch",
    "paged_decode_attention_torch",
]
