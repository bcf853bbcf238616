"""Pages of memory-mapped checkpoint tensors handed back to the kernel once nothing needs them."""
import bisect
import ctypes
import mmap
from pathlib import Path

import torch


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
