"""The host CPU as Linux lists it in /proc/cpuinfo, read once: the native build's cache key, the
experts kernel's ISA choice, the probe's machine block and the peers' build options all ask it.
Where there is no /proc/cpuinfo (not Linux), every field is empty."""
from functools import lru_cache

CPUINFO = "/proc/cpuinfo"


@lru_cache(maxsize=1)
def _lines() -> tuple[tuple[str, str], ...]:
    """(field, value) of every "field : value" line, in order (one block per logical CPU)."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return ()
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return tuple((name.strip(), value.strip()) for name, value in pairs)


def field(name: str) -> str:
    """The first CPU's value of a field ("vendor_id", "model name", "flags", ...), or ""."""
    return next((value for key, value in _lines() if key == name), "")


def flags() -> set[str]:
    """The ISA extensions the CPU lists ("avx512_bf16", "amx_tile", ...)."""
    return set(field("flags").split())


def vendor() -> str:
    """"AuthenticAMD", "GenuineIntel", ... or "" where not listed."""
    return field("vendor_id")


def identity() -> str:
    """Every distinct ISA and model line (x86's flags and model name, Arm's Features and CPU part):
    what a -march=native binary depends on."""
    keys = ("flags", "model name", "Features", "CPU part")
    return "".join(sorted({f"{key}: {value}\n" for key, value in _lines() if key in keys}))
