"""The hardware peaks S-MFU and S-MBU are measured against.

Measured first: moegen.planner.probe (cached per machine) gives the best GEMM FLOP/s of the run's
dtype and the memory bandwidth where the weights are read from during compute (device memory on
CUDA, host memory on the CPU). Without a probe, GPU datasheet figures (dense, no sparsity) stand
in; a CPU has no datasheet entry, so its utilisations are then left out rather than invented.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from moegen.dtypes import dtype_name
from moegen.errors import InputError, MoegenError

PROBE_MODES = ("quick", "full", "fresh", "off")
_T = 1e12
# name fragment (lower case, most specific first) -> dense FLOP/s per dtype, memory GB/s
DATASHEET = [
    ("h100 pcie", {"bfloat16": 756 * _T, "float16": 756 * _T, "float32": 51 * _T}, 2000.0),
    ("h100", {"bfloat16": 989 * _T, "float16": 989 * _T, "float32": 67 * _T}, 3350.0),
    ("h200", {"bfloat16": 989 * _T, "float16": 989 * _T, "float32": 67 * _T}, 4800.0),
    ("a100", {"bfloat16": 312 * _T, "float16": 312 * _T, "float32": 19.5 * _T}, 2039.0),
    ("l40s", {"bfloat16": 362 * _T, "float16": 362 * _T, "float32": 91.6 * _T}, 864.0),
    ("l4", {"bfloat16": 121 * _T, "float16": 121 * _T, "float32": 30.3 * _T}, 300.0),
    ("rtx a5000", {"bfloat16": 111 * _T, "float16": 111 * _T, "float32": 27.8 * _T}, 768.0),
    ("4090", {"bfloat16": 165 * _T, "float16": 165 * _T, "float32": 82.6 * _T}, 1008.0),
    ("t4", {"float16": 65 * _T, "float32": 8.1 * _T}, 320.0),
]


@dataclass(frozen=True)
class Peaks:
    flops_per_s: float | None     # dense peak of the run's dtype
    bw_gbps: float | None         # memory bandwidth the weights are read at (GB = 1e9 bytes)
    source: str                   # "probe", "probe (cached)", "datasheet: NAME" or "none: why"

    def to_dict(self) -> dict:
        return asdict(self)


def gpu_name(device: str) -> str | None:
    import torch
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.device(device))


def datasheet_peaks(device: str, dtype: str) -> Peaks:
    name = gpu_name(device)
    if name is None:
        return Peaks(None, None, "none: no datasheet for CPUs (run the probe for measured peaks)")
    for fragment, flops, bw in DATASHEET:
        if fragment in name.lower():
            return Peaks(flops.get(dtype_name(dtype)), bw, f"datasheet: {name}")
    return Peaks(None, None, f"none: no datasheet entry for {name}")


def probed_peaks(result: dict, device: str, dtype: str) -> Peaks:
    flops = result.get("gemm_best_flops_per_s", {}).get(dtype_name(dtype)) or None
    key = "device_mem_bw_gbps" if str(device).startswith("cuda") else "host_mem_bw_gbps"
    source = "probe" + (" (cached)" if result.get("cached") else "") + (", quick" if result.get("quick") else "")
    return Peaks(flops, result.get(key) or None, source)


def hardware_peaks(device: str, dtype: str, probe_mode: str = "quick") -> tuple[Peaks, dict | None]:
    """(peaks, the probe's result or None). probe_mode: "quick" or "full" probe (cached per
    machine; a first quick probe takes some seconds), "fresh" (a full probe measured now, in this
    run, so S-MFU is taken against what the machine does today; ~20 s), "off" for datasheet
    values only."""
    if probe_mode not in PROBE_MODES:
        raise InputError(f"probe mode must be one of {', '.join(PROBE_MODES)}, got {probe_mode!r}")
    if probe_mode == "off":
        return datasheet_peaks(device, dtype), None
    from moegen.planner.probe import probe
    try:
        result = probe(device=str(device), quick=probe_mode == "quick", refresh=probe_mode == "fresh")
    except (MoegenError, RuntimeError, OSError) as e:
        sheet = datasheet_peaks(device, dtype)
        return Peaks(sheet.flops_per_s, sheet.bw_gbps, f"{sheet.source} (probe failed: {e})"), None
    return probed_peaks(result, device, dtype), result
