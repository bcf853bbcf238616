"""Parse user-facing dtype names."""
import torch

from moegen.errors import DTypeError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def dtype_name(dtype: "str | torch.dtype") -> str:
    """The canonical name of a supported dtype ("bf16" or torch.bfloat16 -> "bfloat16")."""
    return str(parse_dtype(dtype)).removeprefix("torch.")


def parse_dtype(dtype: "str | torch.dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise DTypeError(f"unsupported dtype {dtype}; supported: float32, bfloat16, float16")
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise DTypeError(f"unknown dtype {dtype!r}; supported: {', '.join(sorted(set(DTYPES)))}") from None
