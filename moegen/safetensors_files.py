"""safetensors files read without memory-mapping them: each file's header (names, dtypes, shapes,
byte ranges) and tensors read with pread into memory the caller owns.

The disk tier (moegen.engine.disk_tier) reads the weights it streams this way, on its reader
thread. Two reasons not to use safetensors' memory map there: a mapped page that a file no longer
holds (a shard truncated while the engine runs) kills the process with SIGBUS, where a short read
is an error naming the file; and each read's pages are dropped from the page cache right after it
(posix_fadvise DONTNEED), so streaming a model bigger than memory does not fill the machine's RAM
with a second, cached copy of it.
"""
import json
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moegen.errors import CheckpointError

# safetensors' dtype names
STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# A tensor holding every expert of a layer (transformers 5's gate_up_proj / down_proj, FP8 scales too)
FUSED_EXPERTS = re.compile(r".*\.experts\.[a-z_]+$")
EXPERT_INDEX = re.compile(r".*\.experts\.(\d+)\.")
MAX_HEADER_BYTES = 100 << 20          # safetensors' own limit
DIRECT_ALIGN = 4096                   # O_DIRECT reads: file offset, length and memory aligned to this


@dataclass(frozen=True)
class Entry:
    """One tensor of a file (or one row of its first dimension: an expert of a fused tensor)."""
    path: Path
    dtype: str                # safetensors' name: "BF16", "F8_E4M3"
    shape: tuple
    offset: int               # of its first byte in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORED_DTYPES[self.dtype]

    def row(self, index: int) -> "Entry":
        n = self.nbytes // self.shape[0]
        return replace(self, shape=self.shape[1:], offset=self.offset + index * n, nbytes=n)


def read_header(path: Path) -> dict[str, Entry]:
    """Name -> Entry of every tensor in a safetensors file, from its header alone."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= MAX_HEADER_BYTES:
                raise ValueError(f"header size {size}")
            header = json.loads(f.read(size))
            end = os.fstat(f.fileno()).st_size
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-download or re-save it") from None
    base, entries = 8 + size, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        if info["dtype"] not in STORED_DTYPES or base + hi > end:
            raise CheckpointError(f"{path}: tensor {name} ({info['dtype']}, bytes {lo}..{hi}) is not readable: "
                                  f"the file may be truncated ({end} bytes)")
        entries[name] = Entry(path, info["dtype"], tuple(info["shape"]), base + lo, hi - lo)
    return entries


def read_headers(files: dict[str, Path]) -> dict[str, Entry]:
    """Tensor name -> Entry, for the tensors of the name -> file map (moegen.loader.weight_files)."""
    headers = {f: read_header(f) for f in set(files.values())}
    return {name: headers[f][name] for name, f in files.items() if name in headers[f]}


class DirectScratch:
    """A reader thread's memory for O_DIRECT reads: DIRECT_ALIGN-aligned pieces handed out one
    after another until `reset` (grown, never shrunk)."""

    def __init__(self):
        self.buffer, self.used = torch.empty(0, dtype=torch.uint8), 0

    def reset(self, need: int) -> None:
        """Room for `need` bytes of pieces from now on (count DIRECT_ALIGN more for each piece)."""
        if self.buffer.numel() < need:
            self.buffer = torch.empty(need, dtype=torch.uint8)
        self.used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        start = self.used + -(self.buffer.data_ptr() + self.used) % DIRECT_ALIGN
        if start + nbytes > self.buffer.numel():
            raise RuntimeError(f"DirectScratch: {nbytes} bytes do not fit (reset with more)")
        self.used = start + nbytes
        return self.buffer[start:start + nbytes]


class FileReads:
    """pread into tensors; one descriptor per file, opened once (also by several threads)."""

    def __init__(self):
        self.fds: dict[Path, int] = {}
        self.direct_fds: dict[Path, int | None] = {}
        self.lock = threading.Lock()
        self.bytes_read = 0

    def _fd(self, path: Path) -> int:
        with self.lock:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
            return self.fds[path]

    def read_into(self, entry: Entry, out: torch.Tensor) -> None:
        """entry's bytes into `out` (a contiguous CPU tensor of entry.nbytes), then its pages out
        of the page cache. A short read is a CheckpointError naming the file."""
        fd, view = self._fd(entry.path), memoryview(out.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < entry.nbytes:
            n = os.preadv(fd, [view[done:]], entry.offset + done)
            if n <= 0:
                raise CheckpointError(f"{entry.path}: cannot read bytes {entry.offset + done}..{entry.offset + entry.nbytes}"
                                      f" (file size {os.fstat(fd).st_size}): the file was truncated or replaced "
                                      "while moegen was reading it")
            done += n
        os.posix_fadvise(fd, entry.offset, entry.nbytes, os.POSIX_FADV_DONTNEED)
        with self.lock:
            self.bytes_read += entry.nbytes

    def read_direct(self, entry: Entry, scratch: "DirectScratch") -> torch.Tensor:
        """entry's bytes (a uint8 view into `scratch`), read with O_DIRECT: the disk's DMA straight
        into memory, no page-cache copy for the CPU to make or to drop. Where the file system
        refuses O_DIRECT (tmpfs), a plain `read_into` instead."""
        start = entry.offset - entry.offset % DIRECT_ALIGN
        span = -(-(entry.offset + entry.nbytes - start) // DIRECT_ALIGN) * DIRECT_ALIGN
        fd = self._direct_fd(entry.path)
        if fd is None:
            out = scratch.take(entry.nbytes)
            self.read_into(entry, out)
            return out
        buf = scratch.take(span)
        view, done, want = memoryview(buf.numpy()), 0, entry.offset + entry.nbytes - start
        while done < want:
            n = os.preadv(fd, [view[done:]], start + done)
            if n <= 0:
                raise CheckpointError(f"{entry.path}: cannot read bytes {start + done}..{entry.offset + entry.nbytes}"
                                      f" (file size {os.fstat(fd).st_size}): the file was truncated or replaced "
                                      "while moegen was reading it")
            done += n
        with self.lock:
            self.bytes_read += entry.nbytes
        return buf[entry.offset - start:entry.offset - start + entry.nbytes]

    def _direct_fd(self, path: Path) -> int | None:
        with self.lock:
            if path not in self.direct_fds:
                try:
                    self.direct_fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) \
                        if hasattr(os, "O_DIRECT") else None
                except OSError:             # EINVAL: this file system has no O_DIRECT
                    self.direct_fds[path] = None
            return self.direct_fds[path]

    def tensor(self, entry: Entry) -> torch.Tensor:
        out = torch.empty(entry.shape, dtype=entry.torch_dtype)
        self.read_into(entry, out)
        return out

    def close(self) -> None:
        with self.lock:
            for fd in [*self.fds.values(), *self.direct_fds.values()]:
                if fd is not None:
                    os.close(fd)
            self.fds.clear()
            self.direct_fds.clear()


class HeaderReader:
    """The loader's reader interface (`name in reader`, `get`, `stored_dtype`) over file headers:
    `get` gives a tensor of the stored shape and dtype on the meta device (what a weight will be,
    nothing read) or, with `reads`, read from the file. `expert`: while set, fused tensors give
    only that expert's row (read alone), broadcast over the expert dimension so that the loader's
    `t[expert]` finds it."""

    def __init__(self, entries: dict[str, Entry], reads: FileReads | None = None):
        self.entries, self.reads = entries, reads
        self.expert: int | None = None

    def __contains__(self, name) -> bool:
        return name in self.entries

    def stored_dtype(self, name: str) -> str:
        return self.entries[name].dtype

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        fused = self.expert is not None and FUSED_EXPERTS.match(name)
        part = entry.row(self.expert) if fused else entry
        if self.reads is None:
            t = torch.empty(part.shape, dtype=part.torch_dtype, device="meta")
        else:
            t = self.reads.tensor(part)
        return t.unsqueeze(0).expand(entry.shape[0], *part.shape) if fused else t

    def for_weight(self, name: str) -> "HeaderReader":
        """Set up for producing canonical weight `name` (an expert's: its row of fused tensors)."""
        m = EXPERT_INDEX.match(name)
        self.expert = int(m.group(1)) if m else None
        return self
