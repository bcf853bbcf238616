"""Memory sizes: parse sizes like "8GB"; this machine's host memory. (What the engine takes of
them, and what stays resident on a device, is its policy: moegen.planner.policy.)"""
import os
import re

from moegen.errors import InputError

UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
         "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_bytes(value) -> int | None:
    """None, an int, or a string such as "512MB", "8GiB", "1.5g" (binary units) -> bytes."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in UNITS:
        raise InputError(f"cannot read memory size {value!r}; use e.g. 512MB, 8GB, 1.5GiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

