"""A checkpoint's tensors on disk: the name -> file map of its *.safetensors (with or without
model.safetensors.index.json) and a reader that memory-maps each file once."""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moegen.errors import CheckpointError
from moegen.layers.quantized import tensors_of
from moegen.loader.mapped import MappedPages


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


def _aliases(kept, source: torch.Tensor) -> bool:
    """Whether the weight kept shares memory with a checkpoint tensor (then it must stay mapped)."""
    lo, hi = source.data_ptr(), source.data_ptr() + source.numel() * source.element_size()
    return any(lo <= t.data_ptr() < hi or t.data_ptr() <= lo < t.data_ptr() + t.numel() * t.element_size()
               for t in tensors_of(kept))
