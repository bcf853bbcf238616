"""What identifies a checkpoint's answers, cheaply: the key of every cache moegen keeps.

A cache keyed by a checkpoint's *path* (or by its config.json alone) answers for another model as
soon as the directory is rebuilt or swapped: a fixture of another seed, a fine-tune saved over
its base. Hashing every weight byte costs minutes on a large model, so `checkpoint_fingerprint`
hashes every small file whole (config, generation config, tokenizer, chat template, shard index)
and each large file (the weights) by its size, its first MiB (a safetensors header: every
tensor's name, dtype, shape and offset) and 32 blocks of 4 KiB spread evenly over it. Weights that
differ anywhere but in a sliver between the samples differ in some sample: new random weights,
training, quantization all change nearly every block.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

WHOLE_BELOW = 64 << 20          # files smaller than this are hashed whole
HEAD_BYTES = 1 << 20
SAMPLES, SAMPLE_BYTES = 32, 4096


def checkpoint_fingerprint(model_dir) -> str | None:
    """sha256 (hex) over the files of a checkpoint directory (module doc); None if not a directory."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            if size < WHOLE_BELOW:
                digest.update(f.read())
            else:
                _sample(f, size, digest)
    return digest.hexdigest()


def _sample(f, size: int, digest) -> None:
    digest.update(f.read(HEAD_BYTES))
    step = (size - HEAD_BYTES) // SAMPLES
    for i in range(SAMPLES):
        digest.update(os.pread(f.fileno(), SAMPLE_BYTES, HEAD_BYTES + i * step))
