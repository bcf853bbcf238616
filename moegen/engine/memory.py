"""Memory budgets: parse sizes like "8GB", pick defaults, choose what stays resident on a device."""
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


def choose_resident(groups: dict, sizes: dict, budget_bytes: int) -> set:
    """Keep modules on the device while they fit: the top-level and per-layer dense groups first
    (every step needs them), then experts in layer order."""
    order = [k for k in groups if ".experts." not in k] + [k for k in groups if ".experts." in k]
    resident, used = set(), 0
    for key in order:
        if used + sizes[key] <= budget_bytes:
            resident.add(key)
            used += sizes[key]
    return resident
