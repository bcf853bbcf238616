"""A checkpoint directory opened into a moegen model: each weight's source found (per-expert or fused
expert layouts), checked against the config (names, shapes, dtypes from the headers) before any
data is read, then read on demand: memory-mapped where used as stored, cast or dequantized where
not (FP8/GPTQ GEMM operands stay quantized)."""
import re
from pathlib import Path

import torch

from moegen.dtypes import parse_dtype
from moegen.errors import CheckpointError, MissingTensorError, ShapeMismatchError, UnexpectedTensorError
from moegen.layers.quantized import Fp8BlockWeight, dequantize, is_quantized, map_tensors
from moegen.models.model import MoEModel
from moegen.models.registry import family
from moegen.safetensors_files import EXPERT_INDEX, FUSED_EXPERTS, Entry, HeaderReader, read_headers
from moegen.loader.config import read_config, read_json_config
from moegen.loader.files import TensorReader, weight_files
from moegen.loader.quant import QuantScheme, quant_scheme, read_weight, stack_rows, weight_parts


# Kept in float32 whatever the model dtype, as transformers does (routing must not round it).
FP32_TENSORS = re.compile(r".*\.e_score_correction_bias$")
# Present in real checkpoints but not used for next-token generation.
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


def _names(names: list[str], limit: int = 12) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def expert_sources(moe, expert_names, reader: TensorReader, scheme: QuantScheme | None = None) -> dict[str, callable]:
    """Canonical expert tensor name -> function producing it from whichever layout is on disk."""
    fused_gu, fused_d = f"{moe.prefix}.experts.gate_up_proj", f"{moe.prefix}.experts.down_proj"
    gate, up, down = expert_names
    parts = lambda name: weight_parts(reader, name, scheme)   # noqa: E731
    out = {}
    for e in range(moe.n_experts):
        key = moe.expert_key(e)
        if fused_gu in reader or fused_d in reader:
            out[f"{key}.gate_up"] = parts(fused_gu), (lambda e=e: read_weight(reader, fused_gu, scheme, e))
            out[f"{key}.down"] = parts(fused_d), (lambda e=e: read_weight(reader, fused_d, scheme, e))
        else:
            g, u, d = (f"{key}.{n}.weight" for n in (gate, up, down))
            out[f"{key}.gate_up"] = parts(g) + parts(u), (
                lambda g=g, u=u: stack_rows([read_weight(reader, g, scheme), read_weight(reader, u, scheme)]))
            out[f"{key}.down"] = parts(d), (lambda d=d: read_weight(reader, d, scheme))
    return out


def tensor_sources(model: MoEModel, expert_names, reader: TensorReader, scheme: QuantScheme | None = None) -> dict:
    """Canonical name -> (checkpoint names it needs, producer)."""
    sources = {}
    for layer in model.layers:
        if layer.is_moe:
            sources.update(expert_sources(layer.ffn, expert_names, reader, scheme))
    for name in model.weight_shapes():
        if name not in sources:
            sources[name] = weight_parts(reader, name, scheme), (lambda name=name: read_weight(reader, name, scheme))
    return sources


def _checked_finite(t, name: str, path: Path) -> None:
    """One pass over the weights: a NaN would otherwise surface only as garbage tokens."""
    if is_quantized(t):
        # FP8's NaN is the bit pattern s.1111.111; integer codes cannot be NaN, their scales can
        bad = not torch.isfinite(t.scales).all() or (
            isinstance(t, Fp8BlockWeight) and bool(((t.data.view(torch.uint8) & 0x7F) == 0x7F).any()))
    else:
        bad = t.is_floating_point() and not torch.isfinite(t).all()
    if bad:
        raise CheckpointError(f"{path}: tensor {name} holds NaN or Inf values")


def is_ignored(name: str, model: MoEModel) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    # DeepSeek-V3 checkpoints carry the multi-token-prediction layer after the last decoder layer.
    return bool(IGNORED_TENSORS.match(name)) or (m is not None and int(m.group(1)) >= len(model.layers))


class Checkpoint:
    """A checkpoint directory opened for reading: the model its config builds, and each weight's
    source, checked before any data is read (names against the files' index, shapes and dtypes
    from their headers). The model starts with every weight as its skeleton (what it will be, on
    the meta device: sizes without data); `load(names)` reads weights into model.weights. The
    disk tier (moegen.engine.disk_tier) reads the ones it streams itself, through `extents` or
    the producers over its own reads (`producers`)."""

    def __init__(self, path: str | Path, dtype="float32"):
        self.path, dtype = Path(path), parse_dtype(dtype)
        cfg = read_config(self.path)
        self.scheme = quant_scheme(read_json_config(self.path / "config.json"), str(self.path / "config.json"))
        self.expert_names = family(cfg.model_type).EXPERT_NAMES
        self.model = model = family(cfg.model_type).build(cfg)
        model.dtype, model.checkpoint = dtype, self
        self.files = weight_files(self.path)
        self.reader = TensorReader(self.files)
        self.sources = self._sources(self.reader)
        self._check_names()
        self.entries = read_headers(self.files)
        self.gemm_only, self.shapes = set(model.linear_weight_names()), model.weight_shapes()
        meta = HeaderReader(self.entries)
        self.skeletons = {name: self._kept(name, self._checked(name, produce), meta=True)
                          for name, (_, produce) in self._sources(meta).items()}
        model.weights.update(self.skeletons)

    def _sources(self, reader) -> dict:
        try:
            return tensor_sources(self.model, self.expert_names, reader, self.scheme)
        except CheckpointError as e:
            raise type(e)(f"{self.path}: {e}") from None

    def _check_names(self) -> None:
        cfg = self.model.config
        missing = sorted({n for needed, _ in self.sources.values() for n in needed if n not in self.reader})
        if missing:
            raise MissingTensorError(f"{self.path}: checkpoint lacks {len(missing)} tensor(s) the "
                                     f"{cfg.model_type} config needs: {_names(missing)}")
        needed = {n for names, _ in self.sources.values() for n in names}
        unexpected = sorted(n for n in self.reader.files if n not in needed and not is_ignored(n, self.model))
        if unexpected:
            raise UnexpectedTensorError(f"{self.path}: checkpoint has {len(unexpected)} tensor(s) the "
                                        f"{cfg.model_type} config does not use: {_names(unexpected)}")

    def _checked(self, name: str, produce):
        try:
            t = produce()
        except CheckpointError as e:
            raise type(e)(f"{self.path}: {e}") from None
        want = self.shapes[name]
        if tuple(t.shape) != tuple(want):
            raise ShapeMismatchError(f"{self.path}: tensor {name} has shape {tuple(t.shape)}, "
                                     f"config implies {tuple(want)}")
        return t

    def _kept(self, name: str, t, meta: bool = False):
        """A weight as the engine keeps it: GEMM operands as stored (quantized ones too), the
        rest dequantized or cast to the model's dtype (float32 where routing needs it)."""
        if is_quantized(t) and name in self.gemm_only:
            return t                     # stays quantized: dequantized at each GEMM
        dtype = torch.float32 if FP32_TENSORS.match(name) else self.model.dtype
        if meta:
            return torch.empty(t.shape, dtype=dtype, device="meta")
        return dequantize(t, dtype)

    def produce(self, name: str, producer):
        """Weight `name` from a producer of `producers` (or the checkpoint's own), checked and kept."""
        t = self._checked(name, producer)
        _checked_finite(t, name, self.path)
        return self._kept(name, t)

    def load(self, names, own: bool = False) -> None:
        """Read these weights into model.weights: memory-mapped where used as stored, or with own,
        copied into the process's memory (the disk tier: resident weights then stay readable
        whatever happens to the files, and their bytes are counted where the budget says)."""
        for name in names:
            w = self.produce(name, self.sources[name][1])
            self.model.weights[name] = map_tensors(w, torch.clone) if own else w
            self.reader.release_copied(self.model.weights[name])  # a copy: the mapped source goes back

    def producers(self, reader) -> dict:
        """Canonical name -> producer reading through `reader` (a HeaderReader over FileReads)."""
        return {name: produce for name, (_, produce) in self._sources(reader).items()}

    def extents(self, name: str) -> "list[Entry] | None":
        """The file ranges whose bytes, one after the other, are weight `name` as the engine uses
        it (a plain tensor, an expert's slice of a fused tensor, an expert's gate and up stacked
        in the model's dtype): read straight into place. None when it takes more (a cast, a
        quantized weight): then its producer runs."""
        skeleton = self.skeletons[name]
        if is_quantized(skeleton):
            return None
        index = EXPERT_INDEX.match(name)
        parts = [self.entries[n].row(int(index.group(1))) if index and FUSED_EXPERTS.match(n) else self.entries[n]
                 for n in self.sources[name][0]]
        plain = all(p.torch_dtype == skeleton.dtype and p.shape[1:] == tuple(skeleton.shape[1:]) for p in parts)
        if not plain or sum(p.shape[0] if p.shape else 1 for p in parts) != (skeleton.shape[0] if skeleton.dim() else 1):
            return None
        return parts


def load_model(path: str | Path, dtype="float32") -> MoEModel:
    checkpoint = Checkpoint(path, dtype)
    checkpoint.load(checkpoint.sources)
    return checkpoint.model
