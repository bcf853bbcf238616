"""Quantized linear weights: their layouts, how they are made, and how `linear` runs over them.

Two layouts, each exactly the one a widespread checkpoint format stores, so a checkpoint is used
as shipped (no conversion at load, memory-mapped like any other tensor) and what `moegen
quantize` writes is read by every other tool of that format:

FP8 blocks (`Fp8BlockWeight`), as DeepSeek-V3/R1 and the official Qwen3 FP8 releases ship them
(`quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}`):
    data    [N, K] float8_e4m3fn, the checkpoint's `X.weight`
    scales  [ceil(N / bn), ceil(K / bk)] float32, `X.weight_scale_inv` (bn x bk = the block size)
    W[n, k] = float32(data[n, k]) * scales[n // bn, k // bk]
    Blocks at the right and bottom edges may be partial (DeepSeek-V3's kv_a_proj_with_mqa has 576
    rows: 4.5 blocks). Made by `quantize_fp8`: per block, scale = amax / 448 (448 = the largest
    e4m3 value), data = round-to-nearest of W / scale.

Integer groups (`GptqWeight`), GPTQ's layout (`quant_method: gptq`, what AutoGPTQ, GPTQModel,
transformers, vLLM and ExLlama read; 8 or 4 bits, groups of g input features, g = 128 by default):
    qweight [K / p, N] int32, p = 32 / bits values per word, input feature k in word k // p at
            bits [bits * (k % p), bits * (k % p + 1)), unsigned
    qzeros  [K / g, N / p] int32, the group's zero point packed the same way along N; checkpoint
            format "gptq" (v1, the default) stores (zero - 1) mod 2^bits and is read back as
            (stored + 1) mod 2^bits (as AutoGPTQ does), "gptq_v2" stores the zero itself
    scales  [K / g, N] float16
    g_idx   [K] int32, the group of each input feature (k // g unless act-order reordered it)
    W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]
    `quantize_int` makes them by round-to-nearest (not GPTQ's error-compensating solver: the
    format does not care): symmetric (zero = 2^(bits-1), scale = 2 * amax / (2^bits - 1), as GPTQ's
    own quantizer) or asymmetric (the group's [min, max] with 0 included, zero = round(-min / scale)).

Running: weights stay quantized in memory (and cross PCIe quantized); `quantized_linear`
dequantizes one chunk of output features at a time into a reused scratch buffer in the
activation dtype, computed in float32 and rounded once, and multiplies it, so the temporary
stays about DEQUANT_CHUNK_BYTES whatever the weight's size. bf16 chunks on the CPU come from the
native kernels (csrc/dequant.cpp) when built, with the same values as the torch path. Dequantization is elementwise and
deterministic: a float32 run sees exactly the float32 values `dequantize` gives, which is what
the exactness tests hand transformers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from moegen.ops.build import native_ops
from moegen.ops.experts import TILE_K, TileCodes

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                       # largest finite float8_e4m3fn
FP8_BLOCK = (128, 128)
GPTQ_GROUP = 128
GPTQ_BITS = (4, 8)
# Scratch per dequantized chunk, bounded whatever the weight's size. On the CPU 8 MiB: fewer, wider
# GEMMs beat re-reading an L2-sized chunk from cache -- measured on the AMX Xeon (int8, bf16
# activations, 2 threads) against 2 MiB: 512 rows x [2048, 1024] 1.6 vs 2.0 ms, x [1024, 4096]
# 3.6 vs 4.3 ms; 4,096 rows the same or up to 10% faster. On a GPU larger still (fewer launches).
DEQUANT_CHUNK_BYTES = 8 << 20
DEVICE_DEQUANT_CHUNK_BYTES = 64 << 20


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _native_dequant(w, out: torch.Tensor):
    """The native op namespace (csrc/dequant.cpp) for a bf16 CPU chunk, else None (torch path:
    float32, other devices, no native build). Both paths give identical values."""
    if out.device.type != "cpu" or out.dtype != torch.bfloat16 or not all(t.is_contiguous() for t in w.tensors().values()):
        return None
    if isinstance(w, GptqWeight) and w.scales.dtype != torch.float16:     # the kernel reads float16 scales
        return None
    lib = native_ops()
    return lib.ops if lib is not None and hasattr(lib.ops, "dequant_fp8") else None


# ---- FP8 blocks -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fp8BlockWeight:
    """An [N, K] weight in float8_e4m3fn with one float32 scale per block (see module docstring)."""
    data: torch.Tensor
    scales: torch.Tensor
    block: tuple[int, int] = FP8_BLOCK

    format = "fp8"
    is_mkldnn = False

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def expected_scale_shape(self) -> tuple[int, int]:
        (n, k), (bn, bk) = self.data.shape, self.block
        return _cdiv(n, bn), _cdiv(k, bk)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data": self.data, "scales": self.scales}

    def chunk_rows(self, chunk_bytes: int) -> int:
        """Output rows per dequantized chunk: whole blocks, about chunk_bytes of bf16."""
        bn, k = self.block[0], self.data.shape[1]
        return max(1, chunk_bytes // (2 * k * bn)) * bn

    def dequantize_rows(self, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Rows lo:hi (lo a multiple of the block height) into `out` [hi - lo, K]."""
        (bn, bk), k = self.block, self.data.shape[1]
        native = _native_dequant(self, out)
        if native is not None:
            native.dequant_fp8(self.data, self.scales, bn, bk, lo, hi, out)
            return out
        scales = self.scales[lo // bn:_cdiv(hi, bn)].repeat_interleave(bn, 0)[:hi - lo]
        scales = scales.repeat_interleave(bk, 1)[:, :k]
        return torch.mul(self.data[lo:hi].float(), scales, out=out) if out.dtype == torch.float32 \
            else out.copy_(self.data[lo:hi].float().mul_(scales))


def fp8_with_row_block(w: Fp8BlockWeight, rows: int) -> Fp8BlockWeight:
    """The same weight with blocks `rows` tall (rows divides the block height): the scales of each
    block repeated, exact, so that two weights can be stacked at a row count that is not a whole
    number of blocks (a gate and an up projection narrower than 128 rows)."""
    bn, bk = w.block
    if rows == bn:
        return w
    scales = w.scales.repeat_interleave(bn // rows, 0)[:_cdiv(w.data.shape[0], rows)]
    return Fp8BlockWeight(w.data, scales.contiguous(), (rows, bk))


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> Fp8BlockWeight:
    """Block-scaled FP8 of a float weight [N, K]: per block scale = amax / FP8_MAX (1 for a block
    of zeros), data = W / scale rounded to the nearest e4m3 value."""
    (n, k), (bn, bk) = w.shape, block
    nb, kb = _cdiv(n, bn), _cdiv(k, bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32)
    padded[:n, :k] = w.float()
    tiles = padded.view(nb, bn, kb, bk)
    amax = tiles.abs().amax(dim=(1, 3))
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    data = (tiles / scales[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8BlockWeight(data.view(nb * bn, kb * bk)[:n, :k].contiguous(), scales, tuple(block))


# ---- integer groups (GPTQ) --------------------------------------------------------------------

@dataclass(frozen=True)
class GptqWeight:
    """An [N, K] weight in GPTQ's int8/int4 group layout (see module docstring)."""
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    zero_offset: int = 1          # v1 ("gptq") checkpoints store zero - 1 (mod 2^bits); v2 the zero

    is_mkldnn = False

    @property
    def format(self) -> str:
        return f"int{self.bits}"

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.qweight.shape[1], self.qweight.shape[0] * self.pack))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def chunk_rows(self, chunk_bytes: int) -> int:
        """Output features per chunk: a multiple of 128 (whole zero-point words), ~chunk_bytes of bf16."""
        k = self.shape[1]
        return max(1, chunk_bytes // (2 * k * 128)) * 128

    def _unpack(self, words: torch.Tensor) -> torch.Tensor:
        """Unsigned `bits`-wide fields of int32 words [..., W] -> [..., W, p] (field i at bits*i)."""
        shifts = torch.arange(0, 32, self.bits, dtype=torch.int32, device=words.device)
        return (words.unsqueeze(-1) >> shifts) & ((1 << self.bits) - 1)

    def dequantize_rows(self, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Output features lo:hi (lo a multiple of p) into `out` [hi - lo, K]."""
        native = _native_dequant(self, out)
        if native is not None:
            native.dequant_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.zero_offset,
                                lo, hi, out)
            return out
        k, p, n = self.shape[1], self.pack, hi - lo
        q = self._unpack(self.qweight[:, lo:hi]).permute(1, 0, 2).reshape(n, k)          # [n, K]
        zeros = (self._unpack(self.qzeros[:, lo // p:_cdiv(hi, p)]).flatten(1)[:, :n] + self.zero_offset) \
            & ((1 << self.bits) - 1)
        g = self.g_idx.long()
        w = q.sub_(zeros.index_select(0, g).t())
        scales = self.scales[:, lo:hi].float().index_select(0, g).t()
        return torch.mul(w, scales, out=out) if out.dtype == torch.float32 else out.copy_(w.float().mul_(scales))


def pack_fields(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned fields [..., W * p] -> int32 words [..., W], field i of a word at bits * i."""
    p = 32 // bits
    fields = values.to(torch.int64).view(*values.shape[:-1], -1, p)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (fields << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def quantize_int(w: torch.Tensor, bits: int, group_size: int = GPTQ_GROUP, sym: bool = True) -> GptqWeight:
    """Round-to-nearest GPTQ-layout quantization of a float weight [N, K] (v1 zero points)."""
    n, k = w.shape
    maxq = (1 << bits) - 1
    groups = w.float().t().reshape(k // group_size, group_size, n)          # [G, g, N]
    lo = groups.amin(1).clamp(max=0)
    hi = groups.amax(1).clamp(min=0)
    if sym:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    scales = ((hi - lo) / maxq).half()          # stored float16: quantize against the stored value
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    if sym:
        zeros = torch.full_like(scales, (maxq + 1) // 2, dtype=torch.int32)
    else:
        zeros = torch.round(-lo / scales.float()).clamp(0, maxq).to(torch.int32)
    q = torch.round(groups / scales.float()[:, None, :]) + zeros[:, None, :]
    q = q.clamp(0, maxq).reshape(k, n)
    qweight = pack_fields(q.t().contiguous(), bits).t().contiguous()    # pack along K
    qzeros = pack_fields((zeros - 1) & maxq, bits)                       # along N, v1: zero - 1
    g_idx = torch.arange(k, dtype=torch.int32) // group_size
    return GptqWeight(qweight, qzeros, scales, g_idx, bits)


# ---- any quantized weight ---------------------------------------------------------------------

QUANTIZED_TYPES = (Fp8BlockWeight, GptqWeight)


def is_quantized(w) -> bool:
    return isinstance(w, QUANTIZED_TYPES)


def tensors_of(w) -> list[torch.Tensor]:
    """The tensors a weight is stored in: itself, or a quantized weight's parts."""
    return list(w.tensors().values()) if is_quantized(w) else [w]


def stored_bytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(w))


def map_tensors(w, fn):
    """The weight with each of its tensors replaced by fn(tensor) (a copy, a move, a view)."""
    if not is_quantized(w):
        return fn(w)
    return replace(w, **{name: fn(t) for name, t in w.tensors().items()})


def dequantize(w, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole weight [N, K] in `dtype` (float32 arithmetic, rounded once)."""
    if not is_quantized(w):
        return w.to(dtype)
    n, k = w.shape
    return w.dequantize_rows(0, n, torch.empty(n, k, dtype=dtype, device=w.device))


def concat_rows(parts: list):
    """Quantized weights of equal K stacked along N (an expert's gate and up projections)."""
    first = parts[0]
    if isinstance(first, GptqWeight):
        return replace(first, qweight=torch.cat([p.qweight for p in parts], 1),
                       qzeros=torch.cat([p.qzeros for p in parts], 1), scales=torch.cat([p.scales for p in parts], 1))
    rows = math.gcd(first.block[0], *(p.shape[0] for p in parts[:-1]))
    parts = [fp8_with_row_block(p, rows) for p in parts]
    return Fp8BlockWeight(torch.cat([p.data for p in parts]), torch.cat([p.scales for p in parts]), parts[0].block)


def fits_tiles(w) -> bool:
    """Whether a quantized weight has one scale (and zero point) per output column over each
    aligned run of TILE_K inputs, which the fused experts kernel's tiles need: fp8 blocks TILE_K-
    aligned in K (and finite codes, scales below 128 and zero or from 2^-117), GPTQ groups constant over such runs
    (act-order g_idx may break it)."""
    if isinstance(w, Fp8BlockWeight):
        # the kernel stores scales times 2^120, has no NaN codes (0x7f, 0xff), and rounds to bf16
        # with VCVTNE2PS2BF16, which flushes float32 subnormals: nonzero scales from 2^-117 (the
        # smallest nonzero e4m3 value is 2^-9), so that no product is one
        s = w.scales.abs()
        return w.block[1] % TILE_K == 0 and w.device.type == "cpu" and float(s.max()) < 2.0 ** 7 \
            and bool(((s == 0) | (s >= 2.0 ** -117)).all()) \
            and not bool(((w.data.view(torch.uint8) & 0x7F) == 0x7F).any())
    k = w.shape[1]
    starts = w.g_idx[torch.arange(k) // TILE_K * TILE_K]
    return w.device.type == "cpu" and bool(torch.equal(starts, w.g_idx))


def tile_codes(w) -> TileCodes:
    """A quantized weight as the fused experts kernel reads it (`fits_tiles` must hold): each
    element's code, and per output column and TILE_K inputs the scale and zero point, so that
    (decode(code) - zero) * scale is exactly `dequantize`'s arithmetic."""
    n, k = w.shape
    first = torch.arange(_cdiv(k, TILE_K)) * TILE_K            # each tile's first input feature
    if isinstance(w, Fp8BlockWeight):
        bn, bk = w.block
        scales = w.scales.repeat_interleave(bn, 0)[:n][:, first // bk]
        return TileCodes("fp8", w.data, scales.float().contiguous())
    codes = w._unpack(w.qweight).permute(1, 0, 2).reshape(n, k).to(torch.uint8)
    zeros = (w._unpack(w.qzeros).flatten(1)[:, :n] + w.zero_offset) & ((1 << w.bits) - 1)   # [G, N]
    groups = w.g_idx[first].long()
    return TileCodes(w.format, codes, w.scales.float()[groups].t().contiguous(), zeros[groups].t().float().contiguous())


class _Scratch:
    """One growing flat buffer per (device, dtype): chunks are dequantized and used one at a time."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, shape, dtype, device) -> torch.Tensor:
        key, numel = (str(device), dtype), math.prod(shape)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            # a normal tensor even when first asked for in inference mode (the engine's): usable in both
            with torch.inference_mode(False):
                buf = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


SCRATCH = _Scratch()


def quantized_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + bias for a quantized W, dequantized chunk by chunk of output features."""
    n, k = weight.shape
    step = weight.chunk_rows(DEQUANT_CHUNK_BYTES if x.device.type == "cpu" else DEVICE_DEQUANT_CHUNK_BYTES)
    outs = []
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        w = weight.dequantize_rows(lo, hi, SCRATCH.get((hi - lo, k), x.dtype, x.device))
        # the bias inside F.linear, as nn.Linear adds it (same rounding as the reference)
        outs.append(F.linear(x, w, None if bias is None else bias[lo:hi]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
