"""Reading safetensors files without mapping them (moegen.safetensors_files): O_DIRECT reads of
tensors at any offset give the file's bytes, and a truncated file is an error naming it."""
import os

import pytest
import torch
from safetensors.torch import save_file

from moegen.errors import CheckpointError
from moegen.safetensors_files import DIRECT_ALIGN, DirectScratch, FileReads, read_header


@pytest.fixture
def shard(tmp_path):
    g = torch.Generator().manual_seed(0)
    # odd sizes: each tensor starts at an offset that is not a multiple of the alignment
    tensors = {f"t{i}": torch.randn(n, 37, generator=g).bfloat16() for i, n in enumerate([3, 101, 2048, 1])}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    return path, tensors


def direct_supported(path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except (AttributeError, OSError):
        return False


def test_direct_reads_give_the_files_bytes(shard):
    path, tensors = shard
    if not direct_supported(path):
        pytest.skip(f"the file system of {path} has no O_DIRECT (the reads fall back to plain pread)")
    entries, reads, scratch = read_header(path), FileReads(), DirectScratch()
    assert any(e.offset % DIRECT_ALIGN for e in entries.values())
    scratch.reset(sum(e.nbytes + 3 * DIRECT_ALIGN for e in entries.values()))
    got = {name: reads.read_direct(e, scratch) for name, e in entries.items()}   # all held at once
    for name, e in entries.items():
        assert torch.equal(got[name].view(torch.bfloat16).view(e.shape), tensors[name])
    assert all(fd is not None for fd in reads.direct_fds.values())
    assert reads.bytes_read == sum(e.nbytes for e in entries.values())


def test_a_direct_read_of_a_truncated_file_names_it(shard):
    path, _ = shard
    entries = read_header(path)
    last = max(entries.values(), key=lambda e: e.offset)
    os.truncate(path, last.offset + 10)
    scratch = DirectScratch()
    scratch.reset(last.nbytes + 3 * DIRECT_ALIGN)
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        FileReads().read_direct(last, scratch)
