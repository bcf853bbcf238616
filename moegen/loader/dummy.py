"""Models of a config's shapes with random weights made in memory (no checkpoint files): for
benchmarks of real model sizes and for tests; optionally quantized as they are made."""
import copy

import torch

from moegen.dtypes import parse_dtype
from moegen.errors import ConfigError
from moegen.layers.quantized import GPTQ_GROUP, GptqWeight, pack_fields, quantize_fp8
from moegen.models.model import MoEModel
from moegen.models.registry import family
from moegen.loader.checkpoint import FP32_TENSORS
from moegen.loader.config import config_from
from moegen.loader.quant import fp8_quant_config, gptq_config


def dummy_model(source, dtype="bfloat16", seed: int = 0, std: float = 0.02, quantize: str | None = None) -> MoEModel:
    """A model of the config's shapes with random weights made directly in host memory: for
    benchmarks of real model sizes without checkpoint files. Norm weights are one, biases zero.
    quantize "int8"/"int4": the GEMM weights (all but the lm_head) are made directly as random
    GPTQ codes with scales giving about `std` (never a bfloat16 copy); "fp8": each one drawn in
    float32 and block-quantized on its own (one weight's float32 at a time). The model's config
    says so (its quantization_config), so the planner counts their bytes."""
    cfg, dtype = config_from(source), parse_dtype(dtype)
    bits = _dummy_bits(quantize)
    if quantize:
        cfg = copy.deepcopy(cfg)        # the caller's config object stays unquantized
        cfg.quantization_config = gptq_config(bits) if bits else fp8_quant_config()
    model = family(cfg.model_type).build(cfg)
    model.dtype = dtype
    g = torch.Generator().manual_seed(seed)
    quantized = set(model.linear_weight_names()) - {model.lm_head_name} if quantize else set()
    for name, shape in model.weight_shapes().items():
        if name in quantized and bits and shape[1] % GPTQ_GROUP == 0:
            model.weights[name] = random_gptq(shape, bits, std, g)
            continue
        if name in quantized and not bits:
            model.weights[name] = quantize_fp8(torch.empty(shape).normal_(0.0, std, generator=g))
            continue
        keep32 = FP32_TENSORS.match(name)
        t = torch.empty(shape, dtype=torch.float32 if keep32 else dtype)
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t.fill_(1.0)
        elif name.endswith(".bias") or keep32:
            t.zero_()
        else:
            t.normal_(0.0, std, generator=g)
        model.weights[name] = t
    return model


def _dummy_bits(quantize: str | None) -> int:
    """GPTQ bits of a dummy model's quantize argument (0 for fp8 or none)."""
    if quantize not in (None, "fp8", "int8", "int4"):
        raise ConfigError(f"dummy weights quantize={quantize!r}: choose fp8, int8 or int4 (or None)")
    return int(quantize[3:]) if quantize and quantize.startswith("int") else 0


def random_gptq(shape, bits: int, std: float, g: torch.Generator, group_size: int = GPTQ_GROUP) -> GptqWeight:
    """Uniform random codes, scaled to about `std`: made in place. Codes 0 .. 2^bits - 1 have mean
    2^(bits-1) - 1/2, so no integer zero centres them: groups alternate between zero 2^(bits-1)
    and 2^(bits-1) - 1 (means -1/2 and +1/2 of a code). With one zero everywhere, every weight
    would lean the same way (int4: 11% of `std`), a rank-1 term that the positive mean of SiLU
    outputs amplifies layer after layer until every token routes alike and repeats one token."""
    n, k = shape
    p = 32 // bits
    qweight = torch.randint(-(1 << 31), (1 << 31) - 1, (k // p, n), dtype=torch.int32, generator=g)
    mid = 1 << (bits - 1)
    zeros = torch.full((k // group_size, -(-n // p) * p), mid, dtype=torch.int32)
    zeros[1::2] -= 1
    qzeros = pack_fields(zeros - 1, bits)                                 # v1 stores zero - 1
    code_std = ((1 << bits) ** 2 - 1) ** 0.5 / 12 ** 0.5               # of a uniform code
    scales = torch.full((k // group_size, n), std / code_std, dtype=torch.float16)
    return GptqWeight(qweight, qzeros, scales, torch.arange(k, dtype=torch.int32) // group_size, bits)
