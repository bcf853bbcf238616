"""Fused elementwise kernels (csrc/elementwise.cpp) for bf16/fp16 activations on the CPU.

Layers ask `fused_ops(x)`: the native op namespace (rms_norm, silu_mul, rope) when x is a
reduced-precision CPU tensor and the native library is loaded, else None, and then run their
eager PyTorch sequence, whose rounding the kernels replicate. float32 stays eager, so the
float32 comparisons with transformers are untouched by kernel arithmetic. `first_max` is the
greedy choice over logits: the native kernel for bf16 rows, else torch's max(dim).
"""
import torch

from moegen.ops.build import native_ops

FUSED_DTYPES = (torch.bfloat16, torch.float16)


def fused_ops(x: torch.Tensor):
    if x.device.type != "cpu" or x.dtype not in FUSED_DTYPES:
        return None
    ops = native_ops()
    return ops.ops if ops is not None else None


def first_max(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum and the index of its first occurrence, as logits.max(dim=-1) gives them
    (values in float32 from the native kernel; NaN where a row holds a NaN). logits: [B, V]."""
    ops = fused_ops(logits)
    if ops is not None and logits.dtype == torch.bfloat16 and logits.dim() == 2:
        return tuple(ops.first_max(logits))
    best = logits.max(dim=-1)
    return best.values, best.indices
