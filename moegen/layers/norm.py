import torch

from moegen.ops.elementwise import fused_ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, cast back, then scaled: the order transformers uses, so
    bfloat16 results round the same way (one fused pass on the CPU for bf16/fp16)."""
    ops = fused_ops(x)
    if ops is not None and weight.dtype == x.dtype:
        return ops.rms_norm(x, weight, eps)
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)
