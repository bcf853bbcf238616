"""The routed experts of a MoE layer in one native call (csrc/experts.cpp), and its weight format.

At load, each MoE layer's expert weights (resident on the CPU) are packed once into the kernel's
tile layout (`pack_layer`): per expert, gate and up [I, H] and down [H, I], each padded to
multiples of 32 and cut into tiles of 16 output columns x 32 inputs, stored as pairs of adjacent
inputs (the B operand of AMX's TDPBF16PS and AVX-512's VDPBF16PS). The plain per-expert weights
are then dropped. bfloat16 weights become bf16 tiles (1 KiB); quantized ones (`TileCodes`: fp8,
int8, int4) keep their codes in the same order (512 or 256 bytes a tile) with one float32 scale and
zero point per tile column, and the kernel dequantizes each tile to the very bf16 values
moegen.layers.quantized gives, an item's tiles at a time, never a whole weight. `moe_experts` runs every expert's gate_up GEMM, silu(gate) * up, down
GEMM and router weight over its rows, and the sum over each token's experts, in one call.

The ISA is the fastest this CPU runs (AMX, then AVX-512 BF16, then portable C++);
`MOEGEN_EXPERTS_ISA=amx|avx512-bf16|generic` forces one (tests use it; an unavailable one is an
error, not a silent fallback). The engine takes the kernel by default only where it beats
oneDNN's per-expert GEMMs: on AMX, and with AVX-512 BF16 on AMD CPUs (`auto_isa`).
"""
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from moegen.errors import ConfigError
from moegen.ops import cpu
from moegen.ops.build import native_ops

TILE_N, TILE_K = 16, 32
ISA_CODES = {"generic": 0, "avx512-bf16": 1, "amx": 2}
# weight formats the kernel reads, and the bytes of one tile's codes in each
FORMAT_CODES = {"bfloat16": 0, "fp8": 1, "int8": 2, "int4": 3}
TILE_BYTES = {"bfloat16": 1024, "fp8": 512, "int8": 512, "int4": 256}
# layer weights in the kernel's format, beside the layer's other weights
GATE_UP, DOWN = "fused_experts.gate_up", "fused_experts.down"
INT8_GATE_UP, INT8_DOWN = "fused_experts_int8.gate_up", "fused_experts_int8.down"   # experts_kernel=int8


def _round_up(n: int, m: int = 32) -> int:
    return -(-n // m) * m


@lru_cache(maxsize=8)
def _isas_of(ops, int8: bool = False) -> tuple[str, ...]:
    # CPUID and the tile-state request: once per library and kernel
    return tuple(ops.ops.experts_int8_isas() if int8 else ops.ops.experts_isas())


def _pick_isa(env: str, isas, known) -> str | None:
    """The ISA a kernel runs: `env` if set (checked against `known` and the available `isas`), else
    the fastest available; None when none is."""
    forced = os.environ.get(env, "").strip()
    if not forced:
        return isas[0] if isas else None
    if forced not in known:
        raise ConfigError(f"{env}={forced!r}: not available; expected one of {', '.join(known)}")
    if forced not in isas:
        raise ConfigError(f"{env}={forced}: not available on this CPU/build "
                          f"(available: {', '.join(isas) or 'none, native kernels unavailable'})")
    return forced


def available_isas() -> list[str]:
    """The ISAs the native expert kernel can run here, fastest first ([] without native ops)."""
    ops = native_ops()
    return list(_isas_of(ops)) if ops is not None else []


def chosen_isa() -> str | None:
    """The ISA `moe_experts` uses: MOEGEN_EXPERTS_ISA if set (checked), else the fastest; None
    when the native library is unavailable."""
    return _pick_isa("MOEGEN_EXPERTS_ISA", available_isas(), ISA_CODES)


def auto_isa() -> str | None:
    """The ISA `experts_kernel=auto` runs the fused kernel with, or None to keep the per-expert
    oneDNN GEMMs: AMX; AVX-512 BF16 on AMD CPUs; or a forced MOEGEN_EXPERTS_ISA. Measured
    (benchmarks/bench_experts_kernel.py, bf16): on an AMD EPYC (Zen 4, no AMX) the AVX-512 BF16
    kernel runs at 0.36-0.41 TFLOP/s, 82-93% of oneDNN's best fixed-shape GEMM there, against
    0.22-0.38 for per-expert GEMMs (1.1-1.6x); on the Intel Xeon it reached 0.19-0.21 TFLOP/s, a
    third of that CPU's vector peak, so an Intel CPU without usable AMX keeps oneDNN's GEMMs. The
    portable path is for correctness and forcing only."""
    isa = chosen_isa()
    if os.environ.get("MOEGEN_EXPERTS_ISA", "").strip() or isa == "amx":
        return isa
    return isa if isa == "avx512-bf16" and cpu.vendor() == "AuthenticAMD" else None


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


def pack_tiles_into(weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`pack_tiles(weight)` written into `out` (bf16, `tiles_shape` elements) by the native packer:
    no temporaries, one thread (the disk tier's reader packs each streamed expert as it is read)."""
    native_ops().ops.pack_tiles_into(weight, out)
    return out


def _empty(shape, dtype=torch.bfloat16) -> torch.Tensor:
    """Room for packed weights: huge pages where the OS allows (the kernel streams them through the
    TLB), plain memory without native ops."""
    ops = native_ops()
    return ops.ops.empty_packed(list(shape), dtype) if ops is not None else torch.empty(shape, dtype=dtype)


@dataclass(frozen=True)
class TileCodes:
    """A quantized weight [N, K] as the kernel's tiles see it: W[n, k] = (decode(codes[n, k]) -
    zeros[n, k // 32]) * scales[n, k // 32], computed in float32 and rounded to bf16 once. decode is
    the e4m3 value for fp8 (codes float8_e4m3fn, no zeros), the integer itself for int8/int4
    (codes uint8). moegen.layers.quantized makes these from its stored layouts."""
    format: str
    codes: torch.Tensor                 # [N, K]
    scales: torch.Tensor                # [N, ceil(K / 32)] float32
    zeros: torch.Tensor | None = None   # [N, ceil(K / 32)] float32

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def rows(self, lo: int, hi: int) -> "TileCodes":
        return TileCodes(self.format, self.codes[lo:hi], self.scales[lo:hi],
                         None if self.zeros is None else self.zeros[lo:hi])


def _pack_columns(per_tile: torch.Tensor) -> torch.Tensor:
    """Per (column, 32-input tile) values [N, K/32] -> per tile its 16 columns' [Np/16, Kp/32, 16]."""
    n, kt = per_tile.shape
    padded = F.pad(per_tile.float(), (0, 0, 0, _round_up(n) - n))
    return padded.view(-1, TILE_N, kt).permute(0, 2, 1).contiguous()


# The tile element at each code position: blocks of 64 codes = two k-pair rows A, B (element 2n + j
# of a row: column n's input j); byte b of 32-bit lane r holds A[r], A[16 + r], B[r], B[16 + r] for
# b = 0..3, the order csrc/experts.cpp's dequantization unpacks with shifts alone.
CODE_ORDER = torch.tensor([(2 * (i // 64) + (i % 4) // 2) * 32 + (i % 2) * 16 + (i % 64) // 4 for i in range(512)])
FP8_SCALE_BIAS = 2.0 ** 120       # fp8 scales are stored times this (the kernel decodes e4m3 x 2^-120)
INT_ZERO_BIAS = 2.0 ** 23         # int zero points are stored plus this (codes decode as 2^23 + code)


def pack_codes(w: TileCodes) -> list[torch.Tensor]:
    """A quantized weight's (codes, scales[, zeros]) in tile order, each tile's codes in
    CODE_ORDER, scales and zero points in the stored forms the kernel reads (csrc/experts.cpp);
    padding decodes to zero (code 0, scale 0). int4: code j of a tile's 512 in the low nibble of
    byte j, code j + 256 in the high nibble of byte j."""
    tiles = pack_tiles(w.codes.view(torch.uint8)).view(-1, TILE_N * TILE_K)
    codes = tiles[:, CODE_ORDER]
    if w.format == "int4":
        codes = codes[:, :256] | (codes[:, 256:] << 4)
    if w.format == "fp8":
        return [codes.contiguous().view(torch.float8_e4m3fn), _pack_columns(w.scales) * FP8_SCALE_BIAS]
    return [codes.contiguous(), _pack_columns(w.scales), _pack_columns(w.zeros) + INT_ZERO_BIAS]


def pack_layer(gate_ups: list, downs: list, intermediate: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The kernel's (gate_up, down) tensors for one layer from each expert's gate_up [2I, H] (gate
    rows first) and down [H, I], bf16 tensors or `TileCodes`, one expert at a time into the layer's
    tensors: ([tiles], [tiles]) for bf16, ([codes, scales(, zeros)], ...) for quantized ones."""
    hidden, experts = downs[0].shape[0], len(downs)
    fmt = downs[0].format if isinstance(downs[0], TileCodes) else "bfloat16"
    if fmt == "bfloat16":
        gate_up = _empty((experts, 2, *tiles_shape(intermediate, hidden)))
        down = _empty((experts, *tiles_shape(hidden, intermediate)))
        for e, (gu, d) in enumerate(zip(gate_ups, downs)):
            gate_up[e, 0] = pack_tiles(gu[:intermediate])
            gate_up[e, 1] = pack_tiles(gu[intermediate:])
            down[e] = pack_tiles(d)
        return [gate_up], [down]
    per_expert = [([*zip(pack_codes(gu.rows(0, intermediate)), pack_codes(gu.rows(intermediate, 2 * intermediate)))],
                   pack_codes(d)) for gu, d in zip(gate_ups, downs)]
    gate_up = [_empty((experts, 2, *part.shape), part.dtype) for part, _ in per_expert[0][0]]
    down = [_empty((experts, *part.shape), part.dtype) for part in per_expert[0][1]]
    for e, (gu_parts, d_parts) in enumerate(per_expert):
        for i, (gate, up) in enumerate(gu_parts):
            gate_up[i][e, 0], gate_up[i][e, 1] = gate, up
        for i, part in enumerate(d_parts):
            down[i][e] = part
    return gate_up, down


def packed_format(gate_up: list[torch.Tensor], experts: int, hidden: int, intermediate: int) -> str:
    """The format of a layer packed by `pack_layer`, from its codes' dtype and bytes per tile."""
    codes = gate_up[0]
    if codes.dtype == torch.bfloat16:
        return "bfloat16"
    if codes.dtype == torch.float8_e4m3fn:
        return "fp8"
    tiles = experts * 2 * _round_up(hidden) * _round_up(intermediate) // (TILE_N * TILE_K)
    return "int4" if codes.numel() == tiles * TILE_BYTES["int4"] else "int8"


# ---- experts_kernel=int8: csrc/experts_int8.cpp -------------------------------------------------
INT8_ISA_CODES = {"generic": 0, "avx512-vnni": 1, "amx-int8": 2}
INT8_TILE_K = 64                  # inputs per int8 tile (16 groups of 4)
INT8_ZERO_CODE = 128              # the byte an activation of 0 is stored as (csrc/experts_int8.cpp kZeroCode)


def available_int8_isas() -> list[str]:
    """The ISAs `moe_experts_int8` can run here, fastest first ([] without native ops)."""
    ops = native_ops()
    return list(_isas_of(ops, int8=True)) if ops is not None else []


def int8_isa() -> str | None:
    """The ISA `moe_experts_int8` runs: AMX-INT8 tiles where the CPU, build and kernel grant them,
    else AVX-512 VNNI, else portable C++ (correct, slow); MOEGEN_EXPERTS_INT8_ISA=amx-int8|avx512-vnni|
    generic forces one (tests use it). None without native ops."""
    isas = available_int8_isas()
    return _pick_isa("MOEGEN_EXPERTS_INT8_ISA", isas, INT8_ISA_CODES) if isas else None


def quantize_columns(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [N, K] as int8 codes q [N, K] and per-row (output column) float32 scales s [N]:
    W ~= q * s[:, None], q = round(W / s) in [-127, 127], s = max|W[n]| / 127 (1 for a zero row)."""
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales


def pack_int8(weight: torch.Tensor) -> list[torch.Tensor]:
    """A weight [N, K] (bf16 or float) for csrc/experts_int8.cpp: [codes, scales, offsets] with codes
    [Np/16, Kp/64, 16 groups, 16 n, 4] int8 (both sides padded to multiples of 64 with zeros), scales
    [Np] float32 and offsets [Np] int32 = INT8_ZERO_CODE * the column's code sum (the kernel stores
    activations as unsigned bytes, code + INT8_ZERO_CODE)."""
    n, k = weight.shape
    np_, kp = _round_up(n, INT8_TILE_K), _round_up(k, INT8_TILE_K)
    q, scales = quantize_columns(weight)
    q = F.pad(q, (0, kp - k, 0, np_ - n))
    codes = q.view(np_ // TILE_N, TILE_N, kp // INT8_TILE_K, INT8_TILE_K // 4, 4).permute(0, 2, 3, 1, 4)
    offsets = INT8_ZERO_CODE * q.sum(dim=1, dtype=torch.int32)
    return [codes.contiguous(), F.pad(scales, (0, np_ - n)), offsets.to(torch.int32)]


def pack_layer_int8(expert, experts: int, hidden: int, intermediate: int
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One layer's experts for `moe_experts_int8`; expert(e) gives expert e's gate_up [2I, H] (gate
    rows first) and down [H, I] (bf16 or float), asked for one expert at a time (a quantized
    checkpoint's are dequantized only then). gate_up: [codes [E, 2 Ip/16, ...], scales [E, 2 Ip],
    offsets [E, 2 Ip]], the gate's Ip columns (I padded to 64) before the up's; down likewise."""
    ip, hp = _round_up(intermediate, INT8_TILE_K), _round_up(hidden, INT8_TILE_K)

    def room(n: int, k: int) -> list[torch.Tensor]:
        return [_empty((experts, n // TILE_N, k // INT8_TILE_K, INT8_TILE_K // 4, TILE_N, 4), torch.int8),
                _empty((experts, n), torch.float32), _empty((experts, n), torch.int32)]
    gate_up, down = room(2 * ip, hp), room(hp, ip)
    for e in range(experts):
        gu, d = expert(e)
        for half, rows in enumerate((gu[:intermediate], gu[intermediate:])):
            for out, part in zip(gate_up, pack_int8(rows)):
                out[e, half * len(part):(half + 1) * len(part)] = part
        for out, part in zip(down, pack_int8(d)):
            out[e] = part
    return gate_up, down


def moe_experts_int8(x: torch.Tensor, token_idx: torch.Tensor, weights: torch.Tensor, counts: list[int],
                     gate_up: list[torch.Tensor], down: list[torch.Tensor], intermediate: int,
                     top_k: int) -> torch.Tensor:
    """`moe_experts` multiplied in int8 (lossy): weights as packed by `pack_layer_int8`, each
    activation row quantized per row in the kernel."""
    ops = native_ops()
    if ops is None:
        raise ConfigError("experts_kernel=int8 needs moegen's native ops (see `moegen build-ops`)")
    return ops.ops.moe_experts_int8(x.contiguous(), token_idx, weights.float().contiguous(), counts, gate_up, down,
                                    intermediate, top_k, INT8_ISA_CODES[int8_isa()])


def moe_experts(x: torch.Tensor, token_idx: torch.Tensor, weights: torch.Tensor, counts: list[int],
                gate_up: list[torch.Tensor], down: list[torch.Tensor], intermediate: int, top_k: int) -> torch.Tensor:
    """The routed experts' contribution per token, [T, H]: rows grouped by expert (`counts` per
    expert, the token of each in `token_idx`, its router weight in `weights`), each the expert's
    SwiGLU output for x[token] times the weight, summed per token in ascending expert order.
    gate_up / down: a layer packed by `pack_layer`."""
    ops = native_ops()
    if ops is None:
        raise ConfigError("the fused experts kernel needs moegen's native ops (see `moegen build-ops`)")
    isa = ISA_CODES[chosen_isa()]
    fmt = packed_format(gate_up, len(counts), x.shape[-1], intermediate)
    return ops.ops.moe_experts(x.contiguous(), token_idx, weights.float().contiguous(), counts, gate_up, down,
                               intermediate, top_k, isa, FORMAT_CODES[fmt])


def expert_rows(x: torch.Tensor, token_idx: torch.Tensor, weights: torch.Tensor, counts: list[int],
                gate_ups: list, downs: list, intermediate: int, out: torch.Tensor) -> torch.Tensor:
    """Some experts' weighted outputs, row by row, into out [R, H]: the rows of `token_idx` /
    `weights` (R, in expert order, `counts` per expert), each expert's bf16 tiles its own tensors
    (gate_ups[e] [2, ...tiles_shape(I, H)], downs[e] `tiles_shape(H, I)`; None for an expert
    without rows). Per row exactly what `moe_experts` computes before its sum over a token's
    experts (moegen.layers.moe.Dispatch.combine sums them the same way): the disk tier runs the
    experts it streams in groups through this."""
    ops = native_ops()
    if ops is None:
        raise ConfigError("the fused experts kernel needs moegen's native ops (see `moegen build-ops`)")
    ops.ops.moe_expert_rows(x.contiguous(), token_idx, weights.float().contiguous(), counts, gate_ups, downs,
                            intermediate, ISA_CODES[chosen_isa()], out)
    return out
