"""The read bandwidth of the disk a checkpoint lives on: the rate the disk tier streams weights at.

Measured by reading the checkpoint's largest safetensors file with O_DIRECT (past the page cache,
which would report memory speed for a file read recently) in BLOCK_BYTES reads, for up to
READ_BYTES or READ_S; where the filesystem refuses O_DIRECT (tmpfs, some network filesystems),
plain reads of ranges first dropped from the page cache. Cached per filesystem (its device number)
beside the probe's own cache, so a machine measures each disk once.
"""
from __future__ import annotations

import json
import mmap
import os
import time
from pathlib import Path

from moegen.errors import InputError

BLOCK_BYTES = 4 << 20        # large reads, as the disk tier's (an expert is several MB)
READ_BYTES = 1 << 30
READ_S = 1.5
MIN_FILE_BYTES = 64 << 20    # below this the figure is mostly latency: measure a larger file


def _largest_file(path: Path) -> Path:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    if not files:
        raise InputError(f"{path}: no *.safetensors file to measure the disk with")
    return files[-1]


def _open(path: Path) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except (OSError, AttributeError):
        return os.open(path, os.O_RDONLY), False


def measure_disk_read(path: str | Path) -> dict:
    """{"path", "gbps", "bytes", "seconds", "direct"}: sequential reads of the largest file of a
    checkpoint directory (or of a file)."""
    f = _largest_file(Path(path))
    size = f.stat().st_size
    if size < MIN_FILE_BYTES:
        raise InputError(f"{f}: {size} bytes is too small to measure a disk's bandwidth with "
                         f"(at least {MIN_FILE_BYTES >> 20} MiB)")
    fd, direct = _open(f)
    buffer = mmap.mmap(-1, BLOCK_BYTES)        # page-aligned, as O_DIRECT requires
    done, t0 = 0, time.perf_counter()
    try:
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while done < min(size, READ_BYTES) and time.perf_counter() - t0 < READ_S:
            offset = done % (size - size % BLOCK_BYTES or BLOCK_BYTES)
            n = os.preadv(fd, [buffer], offset)
            if n <= 0:
                break
            done += n
        seconds = time.perf_counter() - t0
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
        buffer.close()
    return {"path": str(f), "gbps": done / seconds / 1e9, "bytes": done, "seconds": seconds, "direct": direct}


def _cache_path(path: Path) -> Path:
    from moegen.planner.probe import default_cache_path
    return default_cache_path("cpu").with_name(f"disk-{os.stat(path).st_dev}.json")


def disk_read(path: str | Path, refresh: bool = False) -> dict:
    """measure_disk_read of the filesystem `path` is on, from the cache unless refresh."""
    cache = _cache_path(Path(path))
    if not refresh:
        try:
            return {**json.loads(cache.read_text()), "cached": True}
        except (OSError, ValueError):
            pass
    result = measure_disk_read(path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1))
    return {**result, "cached": False}
