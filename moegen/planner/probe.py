"""Hardware probe: the measured constants the planner's roofline needs.

Measures, in well under 30 s: GEMM FLOP/s per dtype at the shapes experts run (peak on a
cache-warm weight; sustained through weights read from memory), host memory bandwidth, the
decode-attention rate over a paged KV cache (KV bytes/s) on the CPU, and on the CPU the prompt
attention rate and the bandwidth of an elementwise pass; on CUDA also pinned host<->device and
device memory bandwidth. Results are cached as JSON per machine and
device under $XDG_CACHE_HOME/moegen/ (~/.cache when unset); `refresh=True` measures again.

Rates are best-of-N (the least time seen): the planner wants what the hardware can do, and a
noisy neighbour only ever makes a run slower. GB means 1e9 bytes. A copy's bandwidth counts the
bytes read plus the bytes written (STREAM's convention). Each measurement: moegen.planner.rates.
"""
from __future__ import annotations

import datetime
import io
import json
import logging
import os
import platform
import re
import socket
import time
from pathlib import Path

import torch

from moegen.errors import MoegenError
from moegen.ops import cpu
from moegen.planner.rates import (BUDGET_S, DEQUANT_SHAPE, GEMM_DTYPES, GEMM_SHAPES, QUICK_GEMM_SHAPES,
                                  measure_attention, measure_cuda_transfers, measure_dequant, measure_elementwise,
                                  measure_fused_experts, measure_gemm, measure_host_bandwidth,
                                  measure_prefill_attention)

log = logging.getLogger("moegen")
SCHEMA = 8   # 2: CPU GEMMs on packed weights, as the engine runs them; 3: sustained GEMM rates,
             # prompt attention and elementwise bandwidth; 4: dequantization rates of quantized weights;
             # 5: the fused routed-experts kernel's rate by rows per expert (CPU, bf16)
             # 6: the fused kernel on quantized experts too (fp8, int8, int4)
             # 7: the fused kernel (auto) and prompt attention on AVX-512 BF16 on AMD CPUs
             # 8: the experts multiplied in int8 (experts_kernel=int8: "int8-compute" rows)
# ---- machine, cache, entry point --------------------------------------------------------------

def _cpu_model() -> str:
    return cpu.field("model name") or platform.processor() or platform.machine()


def _cpu_isa() -> dict:
    """What the CPU lists (/proc/cpuinfo) and what moegen's experts kernel runs on it: AMX can be
    listed yet unusable (the kernel then takes AVX-512 BF16), so figures name the latter."""
    flags = cpu.flags()
    from moegen.ops.experts import available_isas, int8_isa

    def asked(fn, none):
        try:
            return fn()
        except Exception:       # noqa: BLE001 - a machine report never fails on this
            return none
    isas, int8 = asked(available_isas, []), asked(int8_isa, None)
    return {"listed": sorted(flags & {"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f",
                                      "avx2"}),
            "experts_kernel": isas[0] if isas else None, "experts_int8_kernel": int8}


def machine_info(device: str) -> dict:
    info = {"hostname": socket.gethostname(), "device": device, "torch_version": torch.__version__,
            "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_isa": _cpu_isa(), "host_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory, cuda_version=torch.version.cuda)
    return info


def _parse_device(device: str) -> tuple[str, int]:
    """("cpu", 0) or ("cuda", index) from "cpu", "cuda" or "cuda:N"."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise MoegenError(f"probe: device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MoegenError(f"probe: device {device!r} asked for, but torch.cuda.is_available() is False")
    return kind, int(index or 0)


def measure(device: str = "cpu", quick: bool = False) -> dict:
    """Run every measurement now (no cache). "cuda:N" measures GPU N."""
    kind, index = _parse_device(device)
    if kind == "cpu":
        return {**_measure_all("cpu", quick), "device": device}
    with torch.cuda.device(index):          # plain "cuda" tensors and syncs now mean GPU N
        return {**_measure_all("cuda", quick), "device": device}


def _measure_all(kind: str, quick: bool) -> dict:
    t0 = time.perf_counter()
    shapes = (QUICK_GEMM_SHAPES if quick else GEMM_SHAPES)[kind]
    limits = dict(max_shape_s=0.25, min_total_s=0.05) if quick else dict(max_shape_s=1.0, min_total_s=0.2)
    limits["deadline"] = t0 + BUDGET_S
    gemm = {name: measure_gemm(kind, name, shapes, **limits) for name in GEMM_DTYPES}
    result = {"schema": SCHEMA, **machine_info(kind), "quick": quick,
              "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gemm": gemm,
              "gemm_best_flops_per_s": {name: r["best_flops_per_s"] for name, r in gemm.items()},
              "host_mem_bw_gbps": measure_host_bandwidth(quick),
              "cpu_attention": measure_attention(quick),
              "dequant_params_per_s": measure_dequant(kind, quick)}
    if kind == "cpu":
        result["cpu_prefill_attention"] = measure_prefill_attention(quick)
        result["elementwise_gbps"] = measure_elementwise(quick)
        result["fused_experts"] = measure_fused_experts(quick)
    if kind == "cuda":
        result.update(measure_cuda_transfers(quick))
    result["probe_s"] = time.perf_counter() - t0
    return result


def default_cache_path(device: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"probe-{socket.gethostname()}-{device}")
    return root / "moegen" / f"{name}.json"


def _load_cached(path: Path, device: str, quick: bool) -> dict | None:
    """The cached result if it still describes this machine and is at least as thorough."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not _usable(cached):
        log.warning("probe cache %s does not hold a probe result of schema %d; measuring again", path, SCHEMA)
        return None
    same = cached.get("device") == device and cached.get("torch_version") == torch.__version__
    return cached if same and (quick or not cached.get("quick", True)) else None


def _usable(cached) -> bool:
    """A cache file of this schema whose fields the planner can read (a hand-edited or foreign
    JSON file such as [] or {"gemm": null} is measured again, not a crash on every run)."""
    from moegen.planner.hardware import Hardware
    if not isinstance(cached, dict) or cached.get("schema") != SCHEMA or not isinstance(cached.get("quick"), bool):
        return False
    try:
        Hardware.from_probe(cached)
    except (MoegenError, TypeError, ValueError, KeyError, AttributeError):
        return False
    return True


def _save(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
    os.replace(tmp, path)        # atomic: a concurrent reader never sees half a file


def probe(device: str = "cpu", refresh: bool = False, cache_path: str | Path | None = None,
          quick: bool = False) -> dict:
    """Measured hardware constants, from the per-machine cache unless refresh (or the cache is
    stale: another torch, or a quick result when a full one is asked for). The result carries
    "cached" (whether it came from the file) and "cache_path"."""
    path = Path(cache_path) if cache_path else default_cache_path(device)
    cached = None if refresh else _load_cached(path, device, quick)
    if cached is not None:
        return {**cached, "cached": True, "cache_path": str(path)}
    result = measure(device, quick)
    _save(path, result)
    return {**result, "cached": False, "cache_path": str(path)}


# ---- printing ---------------------------------------------------------------------------------

def _si(value: float | None, unit: str) -> str:
    if not value:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def _gemm_rows(result: dict) -> list[tuple[str, str, str]]:
    rows = []
    for name, r in result.get("gemm", {}).items():
        if not r.get("supported"):
            rows.append((f"GEMM {name}", "unsupported", r.get("error", "")))
            continue
        for s in r["shapes"]:
            shape = f"[{s['m']}, {s['k']}] x [{s['k']}, {s['n']}]"
            note = "calibration" if s.get("calibration") else s.get("skipped", "")
            if s.get("sustained_flops_per_s"):
                note = f"sustained {_si(s['sustained_flops_per_s'], 'FLOP/s')} (weights from memory)"
            rows.append((f"GEMM {name} {shape}", _si(s.get("flops_per_s"), "FLOP/s"), note))
        rows.append((f"GEMM {name} best", _si(r["best_flops_per_s"], "FLOP/s"), ""))
    return rows


def _attention_row(label: str, a: dict) -> tuple[str, str, str]:
    if a.get("error"):
        return label, "-", a["error"]
    note = f"{a['impl']}, {a['dtype']}, {a['seqs']} seqs x {a['ctx']} ctx, {a['n_heads']}/{a['n_kv_heads']} heads"
    return label, f"{a['kv_gbps']:.2f} GB/s of KV", note


def format_probe(result: dict) -> str:
    """A readable table of a probe result."""
    from rich.console import Console
    from rich.table import Table

    where = result.get("gpu_name") or result.get("cpu_model", "?")
    title = (f"moegen probe: {result.get('hostname')} / {result.get('device')} ({where}), "
             f"torch {result.get('torch_version')}, {result.get('torch_threads')} threads"
             f"{', cached' if result.get('cached') else ''}")
    table = Table(title=title, title_justify="left")
    for column in ("measure", "rate", "note"):
        table.add_column(column)
    for row in _gemm_rows(result):
        table.add_row(*row)
    table.add_row("host memory copy", f"{result.get('host_mem_bw_gbps', 0):.1f} GB/s", "read + write")
    for key, label in (("h2d_pinned_gbps", "host -> device (pinned)"), ("d2h_pinned_gbps", "device -> host (pinned)"),
                       ("device_mem_bw_gbps", "device memory copy")):
        if key in result:
            table.add_row(label, f"{result[key]:.1f} GB/s", "")
    table.add_row(*_attention_row("CPU decode attention", result.get("cpu_attention", {})))
    if "cpu_prefill_attention" in result:
        a = result["cpu_prefill_attention"]
        table.add_row("CPU prompt attention", _si(a["flops_per_s"], "FLOP/s"),
                      f"causal, {a['seqs']} prompts x {a['prompt_len']}, {a['n_heads']}/{a['n_kv_heads']} heads")
    experts = result.get("fused_experts") or {}
    for r in experts.get("shapes", ()):
        table.add_row(f"fused experts {r.get('format', 'bfloat16')} {r['rows_per_expert']} rows/expert, "
                      f"{r['experts']} x [{r['hidden']}, {r['intermediate']}]", _si(r["flops_per_s"], "FLOP/s"),
                      r.get("isa") or experts.get("isa") or "")
    if "elementwise_gbps" in result:
        table.add_row("CPU elementwise pass", f"{result['elementwise_gbps']:.1f} GB/s", "SwiGLU activation, read + write")
    if "disk_read" in result:
        d = result["disk_read"]
        table.add_row("disk read", f"{d['gbps']:.2f} GB/s", f"{'O_DIRECT' if d['direct'] else 'page cache dropped'}, "
                      f"{d['bytes'] >> 20} MiB of {d['path']}")
    for fmt, rate in (result.get("dequant_params_per_s") or {}).items():
        table.add_row(f"dequantize {fmt} -> bf16", _si(rate, "param/s"), f"[{DEQUANT_SHAPE[0]}, {DEQUANT_SHAPE[1]}] weight")
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(table)
    return out.getvalue()
