"""Rewrite a checkpoint's GEMM weights quantized: FP8 blocks (DeepSeek-V3's format) or GPTQ
int8/int4 groups, tensor by tensor and shard by shard (never the whole model in memory).

    quantize_checkpoint("ckpt-bf16", "ckpt-int4", "int4")         # `moegen quantize --bits 4`

The layouts are in moegen.layers.quantized. Quantized: every 2-D `*.weight` of a linear layer
(attention projections, MLA's low-rank projections, dense MLPs, shared and routed experts). Kept
as stored: embeddings, lm_head, norms, routers (`*.gate.weight`, Qwen2's shared_expert_gate) —
what DeepSeek-V3 and the GPTQ releases keep — plus any module named in `skip`, and for GPTQ any
weight whose input width is not a whole number of groups (or whose outputs do not fill whole
zero-point words). Tensors keep their shard; the index and config.json follow.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moegen.errors import CheckpointError, ConfigError
from moegen.layers.quantized import GPTQ_BITS, GPTQ_GROUP, dequantize, quantize_fp8, quantize_int
from moegen.loader import (TensorReader, fp8_quant_config, gptq_config, quant_scheme, read_json_config, read_weight,
                           weight_files)

FORMATS = ("fp8", "int8", "int4")
KEPT = re.compile(r"(^|\.)(embed_tokens|lm_head|gate|shared_expert_gate)\.weight$")
FUSED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
INDEX = "model.safetensors.index.json"
# not copied: the index and config are rewritten; a fixture's stamp describes the unquantized files
NOT_COPIED = (INDEX, "config.json", "moegen_fixture.json")


def quantized_tensors(name: str, t: torch.Tensor, fmt: str, group_size: int, sym: bool) -> dict | None:
    """The tensors replacing weight `name` in format `fmt`, or None when it stays as stored."""
    if fmt == "fp8":
        w = quantize_fp8(t)
        return {name: w.data, f"{name}_scale_inv": w.scales}
    bits = int(fmt[3:])
    n, k = t.shape
    pack = 32 // bits
    if k % group_size or n % pack:
        return None
    w = quantize_int(t, bits, group_size, sym)
    base = name.removesuffix(".weight")
    return {f"{base}.{part}": v for part, v in w.tensors().items()}


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def _is_candidate(name: str, t: torch.Tensor) -> bool:
    return name.endswith(".weight") and t.dim() == 2 and t.is_floating_point() and not KEPT.search(name)


def _rewrite_shard(src: Path, dst: Path, fmt: str, group_size: int, sym: bool, skip: set) -> tuple[dict, list]:
    """One shard: (tensor names written -> shard name, weights left unquantized)."""
    out, kept = {}, []
    with safe_open(str(src), framework="pt") as st:
        for name in st.keys():
            if FUSED_EXPERTS.search(name):
                raise ConfigError(f"{src}: {name} is a fused expert tensor; quantize a checkpoint with one tensor "
                                  "per expert (what transformers' save_pretrained writes)")
            t = st.get_tensor(name)
            new = None
            if _is_candidate(name, t) and _module(name) not in skip:
                new = quantized_tensors(name, t, fmt, group_size, sym)
                if new is None:
                    kept.append(name)
            out.update(new or {name: t})
    save_file(out, str(dst / src.name), metadata={"format": "pt"})
    return {name: src.name for name in out}, kept


def quantize_checkpoint(src, dst, fmt: str, group_size: int = GPTQ_GROUP, sym: bool = True,
                        skip=()) -> tuple[Path, list[str]]:
    """Write `src` with its GEMM weights in `fmt` (fp8, int8, int4) to `dst`; returns (dst, the
    candidate weights left unquantized because their shape does not fit the format)."""
    src, dst = Path(src), Path(dst)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown quantization format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt != "fp8" and int(fmt[3:]) not in GPTQ_BITS:
        raise ConfigError(f"GPTQ weights have {' or '.join(map(str, GPTQ_BITS))} bits, not {fmt}")
    if group_size < 1:
        raise ConfigError(f"group size must be >= 1, got {group_size}")
    config = read_json_config(src / "config.json")
    if "quantization_config" in config:
        raise ConfigError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')}); "
                          "quantize an unquantized checkpoint")
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no *.safetensors files in {src}")
    if dst.resolve() == src.resolve():
        raise ConfigError(f"write the quantized checkpoint to another directory than {src}")
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, kept = {}, []
    for shard in shards:
        names, left = _rewrite_shard(shard, dst, fmt, group_size, sym, set(skip))
        weight_map.update(names)
        kept += left
    for f in src.iterdir():          # tokenizer, generation config, ...
        if f.is_file() and f.suffix != ".safetensors" and f.name not in NOT_COPIED:
            shutil.copyfile(f, dst / f.name)
    if (src / INDEX).is_file():
        index = json.loads((src / INDEX).read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config["quantization_config"] = (fp8_quant_config(skip=skip) if fmt == "fp8"
                                     else gptq_config(int(fmt[3:]), group_size, sym))
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst, kept


def dequantize_checkpoint(src, dst, dtype=torch.float32) -> Path:
    """A quantized checkpoint with every quantized weight replaced by its dequantization (the
    engine's own arithmetic, moegen.layers.quantized.dequantize) and no quantization_config: the
    very weights a quantized run computes with, for transformers to run as the reference. One
    shard; unquantized tensors as stored."""
    src, dst = Path(src), Path(dst)
    config = read_json_config(src / "config.json")
    scheme = quant_scheme(config, str(src / "config.json"))
    if scheme is None:
        raise ConfigError(f"{src} is not quantized (config.json has no quantization_config)")
    reader = TensorReader(weight_files(src))
    out = {}
    for name in reader.files:
        if name.endswith("_scale_inv") or re.search(r"\.(qzeros|scales|g_idx)$", name):
            continue                                   # read with their weight
        weight = name.removesuffix(".qweight") + ".weight" if name.endswith(".qweight") else name
        out[weight] = dequantize(read_weight(reader, weight, scheme), dtype).contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in NOT_COPIED:
            shutil.copyfile(f, dst / f.name)
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst
