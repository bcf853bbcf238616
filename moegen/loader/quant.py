"""Quantized checkpoints (config.json's `quantization_config`), read as they are stored (layouts in
moegen.layers.quantized): FP8 blocks (`quant_method: fp8`, DeepSeek-V3's `X.weight` in
float8_e4m3fn + `X.weight_scale_inv`) and GPTQ int8/int4 (`quant_method: gptq`, `X.qweight`,
`X.qzeros`, `X.scales`, `X.g_idx`); and the quantization_configs moegen writes."""
from dataclasses import dataclass

import torch

from moegen.errors import CheckpointError, ConfigError, ShapeMismatchError
from moegen.layers.quantized import FP8_BLOCK, GPTQ_GROUP, Fp8BlockWeight, GptqWeight, concat_rows, is_quantized
from moegen.loader.files import TensorReader


QUANT_METHODS = ("fp8", "gptq")
GPTQ_PARTS = ("qweight", "qzeros", "scales")
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}          # checkpoint_format -> offset added to stored zeros
FP8_STORED = "F8_E4M3"                             # safetensors' name of float8_e4m3fn


@dataclass(frozen=True)
class QuantScheme:
    """A checkpoint's quantization_config, checked: `fp8` blocks or `gptq` integer groups."""
    method: str
    block: tuple[int, int] = FP8_BLOCK        # fp8
    bits: int = 4                             # gptq
    group_size: int = GPTQ_GROUP              # gptq; -1 = one group over all input features
    zero_offset: int = 1                      # gptq: 1 for v1 ("gptq") zero points

    @property
    def weight_format(self) -> str:
        """The planner's name of the format (moegen.planner.model_spec.WEIGHT_FORMAT_BYTES)."""
        return "fp8" if self.method == "fp8" else f"int{self.bits}"


def _fp8_scheme(qc: dict, where: str) -> QuantScheme:
    block = qc.get("weight_block_size") or list(FP8_BLOCK)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ConfigError(f"{where}: quantization_config.weight_block_size must be two positive integers, got {block!r}")
    refused = {"activation_scheme": ("dynamic",), "fmt": ("e4m3",), "scale_fmt": ("float",), "expert_dtype": ("fp8",)}
    for key, allowed in refused.items():
        if key in qc and str(qc[key]).lower() not in allowed:
            raise ConfigError(f"{where}: quantization_config.{key}={qc[key]!r} is not supported (moegen runs FP8 "
                              f"e4m3 weights with float32 block scales and unquantized activations: {key} "
                              f"{allowed[0]!r})")
    return QuantScheme("fp8", block=tuple(block))


def _gptq_scheme(qc: dict, where: str) -> QuantScheme:
    bits, group = qc.get("bits"), qc.get("group_size", GPTQ_GROUP)
    if bits not in (4, 8):
        raise ConfigError(f"{where}: quantization_config.bits={bits!r}: moegen reads 4- and 8-bit GPTQ weights")
    if not isinstance(group, int) or not (group > 0 or group == -1):
        raise ConfigError(f"{where}: quantization_config.group_size={group!r} must be a positive integer or -1")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in GPTQ_FORMATS:
        raise ConfigError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported; supported: "
                          f"{', '.join(GPTQ_FORMATS)}")
    return QuantScheme("gptq", bits=bits, group_size=group, zero_offset=GPTQ_FORMATS[fmt])


def quant_scheme(cfg, where: str = "config") -> QuantScheme | None:
    """The checked quantization scheme of a config (object or dict), None when unquantized."""
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else getattr(cfg, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        return _fp8_scheme(qc, where)
    if method == "gptq":
        return _gptq_scheme(qc, where)
    raise ConfigError(f"{where}: quantization_config.quant_method {qc.get('quant_method')!r} is not supported; "
                      f"supported: {', '.join(QUANT_METHODS)}")


# ---- stored weights: plain, FP8 blocks or GPTQ ----------------------------------------------

def fp8_scale_name(name: str) -> str:
    """`X.weight` -> `X.weight_scale_inv` (DeepSeek-V3); a fused `...gate_up_proj` -> `..._scale_inv`."""
    return f"{name}_scale_inv"


def weight_parts(reader: TensorReader, name: str, scheme: QuantScheme | None) -> list[str]:
    """The checkpoint tensors that hold weight `name` (an `X.weight` or a fused expert tensor)."""
    base = name.removesuffix(".weight")
    if name.endswith(".weight") and f"{base}.qweight" in reader:
        if scheme is None or scheme.method != "gptq":
            raise CheckpointError(f"tensor {base}.qweight is GPTQ-packed but config.json has no gptq "
                                  "quantization_config (quant_method: gptq, bits, group_size)")
        return [f"{base}.{p}" for p in GPTQ_PARTS] + ([f"{base}.g_idx"] if f"{base}.g_idx" in reader else [])
    if name in reader and reader.stored_dtype(name) == FP8_STORED:
        if scheme is None or scheme.method != "fp8":
            raise CheckpointError(f"tensor {name} is stored in float8_e4m3fn but config.json has no fp8 "
                                  "quantization_config (quant_method: fp8, weight_block_size: [128, 128])")
        return [name, fp8_scale_name(name)]
    return [name]


def _gptq_weight(reader: TensorReader, base: str, scheme: QuantScheme) -> GptqWeight:
    qweight, qzeros, scales = (reader.get(f"{base}.{p}") for p in GPTQ_PARTS)
    in_features = qweight.shape[0] * (32 // scheme.bits)
    if f"{base}.g_idx" in reader:
        g_idx = reader.get(f"{base}.g_idx")
    else:
        group = scheme.group_size if scheme.group_size > 0 else in_features
        g_idx = torch.arange(in_features, dtype=torch.int32) // group
    w = GptqWeight(qweight, qzeros, scales, g_idx, scheme.bits, scheme.zero_offset)
    _check_gptq(w, base, scheme)
    return w


def _check_gptq(w: GptqWeight, base: str, scheme: QuantScheme) -> None:
    n, k = w.shape
    groups = k // scheme.group_size if scheme.group_size > 0 else 1
    want = {"qweight": (k // w.pack, n), "qzeros": (groups, -(-n // w.pack)), "scales": (groups, n), "g_idx": (k,)}
    for part, t in w.tensors().items():
        if tuple(t.shape) != want[part]:
            raise ShapeMismatchError(f"tensor {base}.{part} has shape {tuple(t.shape)}; a {scheme.bits}-bit GPTQ "
                                     f"weight [{n}, {k}] in groups of {scheme.group_size} needs {want[part]}")
    if w.qweight.dtype != torch.int32 or w.qzeros.dtype != torch.int32:
        raise CheckpointError(f"tensors {base}.qweight/qzeros must be int32 (packed {scheme.bits}-bit values), "
                              f"got {w.qweight.dtype}/{w.qzeros.dtype}")


def _fp8_weight(reader: TensorReader, name: str, scheme: QuantScheme, index: int | None) -> Fp8BlockWeight:
    data, scales = reader.get(name), reader.get(fp8_scale_name(name))
    if index is not None:
        data, scales = data[index], scales[index]
    w = Fp8BlockWeight(data, scales, scheme.block)
    if tuple(scales.shape) != w.expected_scale_shape() or scales.dtype != torch.float32:
        raise ShapeMismatchError(f"tensor {fp8_scale_name(name)} is {scales.dtype} {tuple(scales.shape)}; the "
                                 f"{tuple(data.shape[-2:])} FP8 weight in {scheme.block[0]}x{scheme.block[1]} blocks "
                                 f"needs float32 {w.expected_scale_shape()} (one scale per block)")
    return w


def read_weight(reader: TensorReader, name: str, scheme: QuantScheme | None, index: int | None = None):
    """Weight `name` as stored: a tensor, or an Fp8BlockWeight / GptqWeight (index: a fused tensor's expert)."""
    parts = weight_parts(reader, name, scheme)
    if len(parts) == 1:
        t = reader.get(name)
        return t if index is None else t[index]
    if parts[0].endswith(".qweight"):
        return _gptq_weight(reader, name.removesuffix(".weight"), scheme)
    return _fp8_weight(reader, name, scheme, index)


def stack_rows(parts: list):
    """Weights of one input width stacked along their outputs (an expert's gate and up)."""
    kinds = {is_quantized(p) for p in parts}
    if kinds == {False}:
        return torch.cat(parts)
    if len(kinds) > 1 or len({type(p) for p in parts}) > 1:
        raise CheckpointError("an expert's gate and up projections are stored in different formats "
                              f"({', '.join(type(p).__name__ for p in parts)}); quantize both or neither")
    return concat_rows(parts)


def fp8_quant_config(block=FP8_BLOCK, skip=()) -> dict:
    """DeepSeek-V3's quantization_config (plus skipped modules, as the Qwen3 FP8 releases list them)."""
    config = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}
    if skip:
        config["modules_to_not_convert"] = sorted(skip)
    return config


def gptq_config(bits: int, group_size: int = GPTQ_GROUP, sym: bool = True) -> dict:
    """The quantization_config of the GPTQ checkpoints moegen writes (round-to-nearest, v1 zeros)."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": False,
            "checkpoint_format": "gptq", "damp_percent": 0.0, "true_sequential": True, "static_groups": False}
