"""Read a Hugging Face checkpoint directory into a moegen model.

config.json is parsed by the transformers config class of its model_type; tensors are
memory-mapped from *.safetensors (with or without model.safetensors.index.json) and cast to the
requested dtype. Expert weights are accepted in both on-disk layouts: per expert
(`experts.{e}.{gate,up,down}` under the family's names) or fused transformers-5 tensors
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]).

Quantized checkpoints (config.json's `quantization_config`) load as they are stored (layouts in
moegen.layers.quantized): FP8 blocks (`quant_method: fp8`, DeepSeek-V3's `X.weight` in
float8_e4m3fn + `X.weight_scale_inv`) and GPTQ int8/int4 (`quant_method: gptq`, `X.qweight`,
`X.qzeros`, `X.scales`, `X.g_idx`). Weights the engine uses only as GEMM operands stay quantized
(dequantized chunk by chunk at each GEMM); the few it uses otherwise (MLA's kv_b_proj, which
absorbed decode views per head; a tied embedding) are dequantized once here. Tensors a
quantized checkpoint stores unquantized (modules its config excludes: norms, routers, lm_head)
load as usual.
"""
import bisect
import copy
import ctypes
import json
import mmap
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from moegen.dtypes import parse_dtype
from moegen.errors import CheckpointError, ConfigError, MissingTensorError, ShapeMismatchError, UnexpectedTensorError
from moegen.layers.quantized import (FP8_BLOCK, GPTQ_GROUP, Fp8BlockWeight, GptqWeight, concat_rows, dequantize,
                                     is_quantized, map_tensors, pack_fields, quantize_fp8, tensors_of)
from moegen.models.model import MoEModel
from moegen.models.registry import checked_family, family
from moegen.safetensors_files import EXPERT_INDEX, FUSED_EXPERTS, Entry, HeaderReader, read_headers

# Kept in float32 whatever the model dtype, as transformers does (routing must not round it).
FP32_TENSORS = re.compile(r".*\.e_score_correction_bias$")
# Present in real checkpoints but not used for next-token generation.
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
QUANT_METHODS = ("fp8", "gptq")
GPTQ_PARTS = ("qweight", "qzeros", "scales")
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}          # checkpoint_format -> offset added to stored zeros
FP8_STORED = "F8_E4M3"                             # safetensors' name of float8_e4m3fn


def read_json_config(cfg_file: Path) -> dict:
    """A config.json's fields, its model_type and shape fields checked."""
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file} must hold a JSON object, not a {type(raw).__name__}")
    if "model_type" not in raw:
        raise ConfigError(f"{cfg_file} has no model_type field")
    check_model_type(raw, str(cfg_file))
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
        self.taken: list[torch.Tensor] = []       # tensors handed out since the caller last cleared it
        self.pages = MappedPages()

    def __contains__(self, name):
        return name in self.files

    def _handle(self, name: str):
        f = self.files[name]
        if f not in self.handles:
            self.handles[f] = open_safetensors(f)
            self.pages.stale = True
        return self.handles[f]

    def get(self, name: str) -> torch.Tensor:
        self.used.add(name)
        try:
            t = self._handle(name).get_tensor(name)
        except (SafetensorError, OSError) as e:   # e.g. a file cut short after its header
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name} ({e}); the file may be "
                                  "truncated") from None
        self.taken.append(t)
        return t

    def release_copied(self, kept) -> None:
        """Hand back the pages of the tensors taken since the last call that `kept` does not use."""
        for t in self.taken:
            if not _aliases(kept, t):
                self.pages(t)
        self.taken.clear()

    def stored_dtype(self, name: str) -> str:
        """The dtype in the file's header (safetensors' spelling: "BF16", "F8_E4M3"), read without the data."""
        return self._handle(name).get_slice(name).get_dtype()


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


class MappedPages:
    """Hands the pages of a memory-mapped checkpoint tensor back to the kernel once nothing needs
    them (the loader made its own copy: a cast, an expert's stacked gate and up; the engine packed
    or pinned it): `release(t)`. safetensors maps each file privately and whole, so without this
    every page ever read stays in the process's RSS as long as any tensor of that file is alive,
    and a packed or pinned model would be there twice. Only pages inside mappings of *.safetensors
    files are touched (madvise MADV_DONTNEED: nothing writes weights, so the data stays in the
    file and a later read faults it back in; releasing a tensor another model still uses is only
    slower, never wrong); anonymous memory never is."""

    MADV_DONTNEED = 4

    def __init__(self):
        self.page = mmap.PAGESIZE
        self.released_bytes = 0
        self.stale = False               # a file was mapped since the ranges were read
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.refresh()

    def refresh(self) -> None:
        self.ranges = self._checkpoint_mappings()
        self.starts = [lo for lo, _ in self.ranges]
        self.stale = False

    @staticmethod
    def _checkpoint_mappings() -> list[tuple[int, int]]:
        try:
            lines = Path("/proc/self/maps").read_text().splitlines()
        except OSError:          # not Linux: nothing to release
            return []
        ranges = []
        for line in lines:
            fields = line.split()
            if len(fields) >= 6 and fields[-1].endswith(".safetensors"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
        return sorted(ranges)

    def _mapped(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and end <= self.ranges[i][1]

    def __call__(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_mkldnn:
            return
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if not self._mapped(start, end):
            if not self.stale:
                return
            self.refresh()
            if not self._mapped(start, end):
                return
        lo = -(-start // self.page) * self.page        # whole pages inside the tensor only
        hi = end // self.page * self.page
        if hi > lo and self._libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), self.MADV_DONTNEED) == 0:
            self.released_bytes += hi - lo


def _aliases(kept, source: torch.Tensor) -> bool:
    """Whether the weight kept shares memory with a checkpoint tensor (then it must stay mapped)."""
    lo, hi = source.data_ptr(), source.data_ptr() + source.numel() * source.element_size()
    return any(lo <= t.data_ptr() < hi or t.data_ptr() <= lo < t.data_ptr() + t.numel() * t.element_size()
               for t in tensors_of(kept))


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


def check_model_type(raw: dict, where: str) -> None:
    """model_type must be a string (a list or number would fail as a dictionary key, deep inside)."""
    if not isinstance(raw["model_type"], str):
        raise ConfigError(f"{where}: model_type must be a string such as \"mixtral\", got {json.dumps(raw['model_type'])}")


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
    check_model_type(source, where)
    checked_family(source, where)
    fields = {k: v for k, v in source.items() if k not in ("model_type", "architectures", "_name_or_path")}
    try:
        return AutoConfig.for_model(source["model_type"], name_or_path=source.get("_name_or_path", ""), **fields)
    except Exception as e:
        raise ConfigError(f"transformers could not build a {source['model_type']} config: {e}") from e


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
