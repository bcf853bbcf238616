"""Causal attention within each prompt of a flat prefill batch: the native kernel
(csrc/prefill_attention.cpp) for bfloat16 on CPUs with AMX-BF16 (its products on tiles) or
AVX-512 BF16, else None (callers run SDPA).

Measured on the AMX Xeon (2 cores), 32 prompts of 128 tokens, 16 heads over 4 kv heads:
head size 64 (Mixtral's) 2.5 ms against SDPA's 4.5; 128 (Qwen3-MoE's) 4.0 against 6.5. On an
AMD EPYC (Zen 4, AVX-512 BF16, no AMX), the products as VDPBF16PS: 6.5 vs 30.1 ms and 10.8 vs 37.4.
Rounding is a flash-attention kernel's (fp32 scores and sums, bf16 probabilities), within bf16's
tolerance of SDPA but not bit-identical, so float32 never takes it.
"""
from __future__ import annotations

import torch

from moegen.ops.build import native_ops


def _kernel():
    """The native op namespace when it was built with the kernel and this CPU runs it."""
    ops = native_ops()   # built from this checkout's csrc/, so the kernel's ops are always there
    return ops.ops if ops is not None and ops.ops.prefill_attention_available() else None


def available_isas() -> list[str]:
    """The ISAs the kernel's products run on here, fastest first ([] where it is unavailable)."""
    ops = _kernel()
    return list(ops.prefill_attention_isas()) if ops is not None else []


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these [tokens, heads, dim] tensors: bf16 on the CPU, head sizes
    multiples of 32, query heads a multiple of kv heads, the last dims contiguous."""
    tensors = (q, k, v)
    return (all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.dim() == 3 and t.stride(2) == 1
                for t in tensors)
            and q.shape[0] == k.shape[0] == v.shape[0] and q.shape[2] == k.shape[2] and k.shape[1] == v.shape[1]
            and q.shape[2] > 0 and v.shape[2] > 0 and q.shape[2] % 32 == 0 and v.shape[2] % 32 == 0
            and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0)


def prefill_attention(q, k, v, seq_lens: list[int], scale: float, sliding_window: int = 0, isa: str = ""):
    """[tokens, heads, dv] outputs of each prompt's causal attention (sliding_window keys at most
    when > 0), or None when the kernel does not apply (the caller runs SDPA, which also handles
    empty prompts and a non-positive scale). isa: one of `available_isas()` to force it (tests);
    by default the fastest."""
    seq_lens = list(seq_lens)
    if not fits(q, k, v) or scale <= 0 or min(seq_lens, default=1) <= 0 or sum(seq_lens) != q.shape[0]:
        return None
    ops = _kernel()
    if ops is None:
        return None
    return ops.prefill_attention(q, k, v, seq_lens, float(scale), int(sliding_window), isa)
