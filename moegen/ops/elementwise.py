"""Fused elementwise kernels (csrc/elementwise.cpp) for bf16/fp16 activations on the CPU.

Layers ask `fused_ops(x)`: the native op namespace (rms_norm, silu_mul, rope) when x is a
reduced-precision CPU tensor and the native library is loaded, else None, and then run their
eager PyTorch sequence, whose rounding the kernels replicate. float32 stays eager, so the
float32 comparisons with transformers are untouched by kernel arithmetic.
"""
import torch

from moegen.ops.build import native_ops

FUSED_DTYPES = (torch.bfloat16, torch.float16)


def fused_ops(x: torch.Tensor):
    if x.device.type != "cpu" or x.dtype not in FUSED_DTYPES:
        return None
    ops = native_ops()
    return ops.ops if ops is not None else None
