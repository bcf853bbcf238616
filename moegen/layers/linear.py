"""Linear projections over plain or pre-packed weights.

On the CPU, oneDNN re-lays out a plain bfloat16 weight into its blocked GEMM format on every
`F.linear` call. Packing each weight once at load time (`prepack`) skips that and sidesteps the
row counts where oneDNN's per-call heuristics fall off a cliff (e.g. 722 rows of a
[7168, 1024] expert: 470 vs 940 GFLOP/s on 2 Zen 4 cores); the results are bit-identical to
`F.linear` (tests/test_linear.py). float32 keeps the plain path: its packed GEMM rounds differently.
Quantized weights (moegen.layers.quantized) are dequantized chunk by chunk right before the GEMM.
"""
import torch
import torch.nn.functional as F

from moegen.layers.quantized import is_quantized, quantized_linear

PACKABLE_DTYPES = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, for a plain weight [N, K], one packed by `pack_weight`, or a quantized one."""
    if is_quantized(weight):
        return quantized_linear(x, weight, bias)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether `pack_weight` can pack weights of this dtype on this machine's CPU."""
    if dtype not in PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_fp16_supported()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A CPU weight [N, K] in oneDNN's GEMM layout: an opaque tensor only `linear` can use."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def prepack(weights: dict, names, release=None) -> int:
    """Replace `weights[name]` by its packed form for each name (in place, one at a time, so the
    plain copy can be released as we go: `release(tensor)` is called on each replaced one, e.g. to
    hand its memory-mapped pages back); returns how many were packed. Quantized weights stay."""
    packed = 0
    for name in names:
        t = weights.get(name)       # absent: repacked for another kernel (moegen.ops.experts)
        if not isinstance(t, torch.Tensor) or t.is_mkldnn or t.device.type != "cpu" \
                or not packing_supported(t.dtype) or t.dim() != 2:
            continue
        weights[name] = pack_weight(t)
        if release is not None:
            release(t)
        packed += 1
    return packed
