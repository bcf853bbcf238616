"""The routed experts of a MoE layer in one native call (csrc/experts.cpp), and its weight format.

At load, each MoE layer's expert weights (bfloat16, resident on the CPU) are packed once into the
kernel's tile layout (`pack_layer`): per expert, gate and up [I, H] and down [H, I], each padded
to multiples of 32 and cut into 1 KiB tiles of 16 output columns x 32 inputs, stored as pairs of
adjacent inputs (the B operand of AMX's TDPBF16PS and AVX-512's VDPBF16PS). The plain per-expert
weights are then dropped. `moe_experts` runs every expert's gate_up GEMM, silu(gate) * up, down
GEMM and router weight over its rows, and the sum over each token's experts, in one call.

The ISA is the fastest this CPU runs (AMX, then AVX-512 BF16, then portable C++);
`MOEGEN_EXPERTS_ISA=amx|avx512-bf16|generic` forces one (tests use it; an unavailable one is an
error, not a silent fallback). The engine takes the kernel by default only where it beats
oneDNN's per-expert GEMMs: on AMX (`auto_isa`).
"""
import os
from functools import lru_cache

import torch
import torch.nn.functional as F

from moegen.errors import ConfigError
from moegen.ops.build import native_ops

TILE_N, TILE_K = 16, 32
ISA_CODES = {"generic": 0, "avx512-bf16": 1, "amx": 2}
# layer weights in the kernel's format, beside the layer's other weights
GATE_UP, DOWN = "fused_experts.gate_up", "fused_experts.down"


def _round_up(n: int, m: int = 32) -> int:
    return -(-n // m) * m


@lru_cache(maxsize=4)
def _isas_of(ops) -> tuple[str, ...]:
    return tuple(ops.ops.experts_isas())      # CPUID and the tile-state request: once per library


def available_isas() -> list[str]:
    """The ISAs the native expert kernel can run here, fastest first ([] without native ops)."""
    ops = native_ops()
    return list(_isas_of(ops)) if ops is not None else []


def chosen_isa() -> str | None:
    """The ISA `moe_experts` uses: MOEGEN_EXPERTS_ISA if set (checked), else the fastest; None
    when the native library is unavailable."""
    isas = available_isas()
    forced = os.environ.get("MOEGEN_EXPERTS_ISA", "").strip()
    if not forced:
        return isas[0] if isas else None
    if forced not in ISA_CODES:
        raise ConfigError(f"MOEGEN_EXPERTS_ISA={forced!r}: expected one of {', '.join(ISA_CODES)}")
    if forced not in isas:
        raise ConfigError(f"MOEGEN_EXPERTS_ISA={forced}: not available on this CPU/build "
                          f"(available: {', '.join(isas) or 'none, native kernels unavailable'})")
    return forced


def auto_isa() -> str | None:
    """The ISA `experts_kernel=auto` runs the fused kernel with, or None to keep the per-expert
    oneDNN GEMMs: AMX (or a forced MOEGEN_EXPERTS_ISA). The AVX-512 BF16 and portable paths are
    correct but slower than oneDNN's own AVX-512 GEMMs (0.1 vs ~0.5 TFLOP/s measured), so they run
    only when asked for."""
    isa = chosen_isa()
    return isa if isa == "amx" or os.environ.get("MOEGEN_EXPERTS_ISA", "").strip() else None


def tiles_shape(n: int, k: int) -> tuple[int, ...]:
    """[Np/16, Kp/32, 16, 16, 2]: a weight [n, k] in tiles, both sides padded to multiples of 32."""
    return _round_up(n) // TILE_N, _round_up(k) // TILE_K, TILE_K // 2, TILE_N, 2


def pack_tiles(weight: torch.Tensor) -> torch.Tensor:
    """A weight [N, K] (out, in) as tiles (`tiles_shape`), zero padded."""
    n, k = weight.shape
    padded = F.pad(weight, (0, _round_up(k) - k, 0, _round_up(n) - n))
    nb, kb, pairs, _, _ = tiles_shape(n, k)
    # [NB, 16 n, KB, 16 pairs, 2] -> [NB, KB, 16 pairs, 16 n, 2]
    return padded.view(nb, TILE_N, kb, pairs, 2).permute(0, 2, 3, 1, 4).contiguous()


def _empty(shape) -> torch.Tensor:
    """Room for packed weights: huge pages where the OS allows (the kernel streams them through the
    TLB), plain memory without native ops."""
    ops = native_ops()
    return ops.ops.empty_packed(list(shape)) if ops is not None else torch.empty(shape, dtype=torch.bfloat16)


def pack_layer(gate_ups: list, downs: list, intermediate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (gate_up, down) for one layer from each expert's gate_up [2I, H] (gate rows
    first) and down [H, I], one expert at a time into the layer's tensors."""
    hidden = downs[0].shape[0]
    gate_up = _empty((len(gate_ups), 2, *tiles_shape(intermediate, hidden)))
    down = _empty((len(downs), *tiles_shape(hidden, intermediate)))
    for e, (gu, d) in enumerate(zip(gate_ups, downs)):
        gate_up[e, 0] = pack_tiles(gu[:intermediate])
        gate_up[e, 1] = pack_tiles(gu[intermediate:])
        down[e] = pack_tiles(d)
    return gate_up, down


def moe_experts(x: torch.Tensor, token_idx: torch.Tensor, weights: torch.Tensor, counts: list[int],
                gate_up: torch.Tensor, down: torch.Tensor, intermediate: int, top_k: int) -> torch.Tensor:
    """The routed experts' contribution per token, [T, H]: rows grouped by expert (`counts` per
    expert, the token of each in `token_idx`, its router weight in `weights`), each the expert's
    SwiGLU output for x[token] times the weight, summed per token in ascending expert order."""
    ops = native_ops()
    if ops is None:
        raise ConfigError("the fused experts kernel needs moegen's native ops (see `moegen build-ops`)")
    isa = ISA_CODES[chosen_isa()]
    return ops.ops.moe_experts(x.contiguous(), token_idx, weights.float().contiguous(), counts, gate_up, down,
                               intermediate, top_k, isa)
