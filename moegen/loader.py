"""Read a Hugging Face checkpoint directory into a moegen model.

config.json is parsed by the transformers config class of its model_type; tensors are
memory-mapped from *.safetensors (with or without model.safetensors.index.json) and cast to the
requested dtype. Expert weights are accepted in both on-disk layouts: per expert
(`experts.{e}.{gate,up,down}` under the family's names) or fused transformers-5 tensors
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]).
"""
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from moegen.dtypes import parse_dtype
from moegen.errors import CheckpointError, ConfigError, MissingTensorError, ShapeMismatchError, UnexpectedTensorError
from moegen.models.model import MoEModel
from moegen.models.registry import checked_family, family

# Kept in float32 whatever the model dtype, as transformers does (routing must not round it).
FP32_TENSORS = re.compile(r".*\.e_score_correction_bias$")
# Present in real checkpoints but not used for next-token generation.
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


def read_json_config(cfg_file: Path) -> dict:
    """A config.json's fields, its model_type and shape fields checked."""
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
    if "model_type" not in raw:
        raise ConfigError(f"{cfg_file} has no model_type field")
    checked_family(raw, where=str(cfg_file))
    return raw


def read_config(path: str | Path):
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist or is not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing: a checkpoint directory needs config.json")
    read_json_config(cfg_file)
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises several types for bad fields
        raise ConfigError(f"{cfg_file}: transformers could not parse it: {e}") from e


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path} (other weight formats are not supported)")
    names = {}
    for f in files:
        with open_safetensors(f) as st:
            names.update({k: f for k in st.keys()})
    return names


def open_safetensors(f: Path):
    """safe_open, with a truncated or corrupt file reported as ours, naming it."""
    try:
        return safe_open(str(f), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({e}); re-download or re-save it") from None


class TensorReader:
    """Lazily opened safetensors files; tensors come back memory-mapped."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.handles, self.used = files, {}, set()

    def __contains__(self, name):
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        f = self.files[name]
        if f not in self.handles:
            self.handles[f] = open_safetensors(f)
        self.used.add(name)
        try:
            return self.handles[f].get_tensor(name)
        except (SafetensorError, OSError) as e:   # e.g. a file cut short after its header
            raise CheckpointError(f"{f}: cannot read tensor {name} ({e}); the file may be truncated") from None


def _names(names: list[str], limit: int = 12) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def expert_sources(moe, expert_names, reader: TensorReader) -> dict[str, callable]:
    """Canonical expert tensor name -> function producing it from whichever layout is on disk."""
    fused_gu, fused_d = f"{moe.prefix}.experts.gate_up_proj", f"{moe.prefix}.experts.down_proj"
    gate, up, down = expert_names
    out = {}
    for e in range(moe.n_experts):
        key = moe.expert_key(e)
        if fused_gu in reader or fused_d in reader:
            out[f"{key}.gate_up"] = [fused_gu], (lambda e=e: reader.get(fused_gu)[e])
            out[f"{key}.down"] = [fused_d], (lambda e=e: reader.get(fused_d)[e])
        else:
            g, u, d = (f"{key}.{n}.weight" for n in (gate, up, down))
            out[f"{key}.gate_up"] = [g, u], (lambda g=g, u=u: torch.cat([reader.get(g), reader.get(u)]))
            out[f"{key}.down"] = [d], (lambda d=d: reader.get(d))
    return out


def tensor_sources(model: MoEModel, expert_names, reader: TensorReader) -> dict:
    """Canonical name -> (checkpoint names it needs, producer)."""
    sources = {}
    for layer in model.layers:
        if layer.is_moe:
            sources.update(expert_sources(layer.ffn, expert_names, reader))
    for name in model.weight_shapes():
        if name not in sources:
            sources[name] = [name], (lambda name=name: reader.get(name))
    return sources


def is_ignored(name: str, model: MoEModel) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    # DeepSeek-V3 checkpoints carry the multi-token-prediction layer after the last decoder layer.
    return bool(IGNORED_TENSORS.match(name)) or (m is not None and int(m.group(1)) >= len(model.layers))


def load_model(path: str | Path, dtype="float32") -> MoEModel:
    path, dtype = Path(path), parse_dtype(dtype)
    cfg = read_config(path)
    fam = family(cfg.model_type)
    model = fam.build(cfg)
    model.dtype = dtype
    reader = TensorReader(weight_files(path))
    sources, shapes = tensor_sources(model, fam.EXPERT_NAMES, reader), model.weight_shapes()
    missing = sorted({n for needed, _ in sources.values() for n in needed if n not in reader})
    if missing:
        raise MissingTensorError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the "
                                 f"{cfg.model_type} config needs: {_names(missing)}")
    needed = {n for names, _ in sources.values() for n in names}
    unexpected = sorted(n for n in reader.files if n not in needed and not is_ignored(n, model))
    if unexpected:
        raise UnexpectedTensorError(f"{path}: checkpoint has {len(unexpected)} tensor(s) the "
                                    f"{cfg.model_type} config does not use: {_names(unexpected)}")
    for name, (_, produce) in sources.items():
        t = produce()
        if tuple(t.shape) != tuple(shapes[name]):
            raise ShapeMismatchError(f"{path}: tensor {name} has shape {tuple(t.shape)}, "
                                     f"config implies {tuple(shapes[name])}")
        # one pass over the weights: a NaN would otherwise surface only as garbage tokens
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {name} holds NaN or Inf values")
        model.weights[name] = t.to(torch.float32 if FP32_TENSORS.match(name) else dtype)
    return model


def config_from(source):
    """A transformers config from a config object, a config.json dict, a checkpoint directory or
    a config JSON file (any name), or the name of a bundled real-model config (moegen/configs)."""
    if hasattr(source, "model_type") and not isinstance(source, dict):
        family(source.model_type)
        return source
    where = "config"
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return read_config(source)
    if isinstance(source, (str, Path)) and Path(source).is_file():
        source, where = read_json_config(Path(source)), str(source)
    elif isinstance(source, str):
        from moegen.configs import load_config
        source, where = load_config(source), f"bundled config {source!r}"
    if not isinstance(source, dict) or "model_type" not in source:
        raise ConfigError(f"cannot read a model config from {source!r}")
    checked_family(source, where)
    fields = {k: v for k, v in source.items() if k not in ("model_type", "architectures", "_name_or_path")}
    try:
        return AutoConfig.for_model(source["model_type"], name_or_path=source.get("_name_or_path", ""), **fields)
    except Exception as e:
        raise ConfigError(f"transformers could not build a {source['model_type']} config: {e}") from e


def dummy_model(source, dtype="bfloat16", seed: int = 0, std: float = 0.02) -> MoEModel:
    """A model of the config's shapes with random weights made directly in host memory: for
    benchmarks of real model sizes without checkpoint files. Norm weights are one, biases zero."""
    cfg, dtype = config_from(source), parse_dtype(dtype)
    model = family(cfg.model_type).build(cfg)
    model.dtype = dtype
    g = torch.Generator().manual_seed(seed)
    for name, shape in model.weight_shapes().items():
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
