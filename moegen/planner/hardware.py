"""Hardware constants of the cost model: GEMM rate curves, bandwidths, dispatch overheads, read
from the probe (moegen.planner.probe) or given explicitly.

Units: *_s seconds, *_bytes bytes, *_gbps 1e9 bytes/s, *_flops_per_s FLOP/s.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from moegen.errors import ConfigError

GB = 1e9
# fused_experts_shapes' curve of the experts kernel multiplying in int8 (experts_kernel=int8)
INT8_COMPUTE = "int8-compute"

# Dispatch costs of eager PyTorch (Python + op launch), counted per op. Rough, not measured by the
# probe: they matter only when GEMMs are small (tiny models, small G).
CPU_OP_OVERHEAD_S = 10e-6
CUDA_OP_OVERHEAD_S = 10e-6
CUDA_SYNC_OVERHEAD_S = 30e-6   # a blocking device<->host copy round trip (CPU decode attention)
SEQ_OVERHEAD_S = 5e-6          # per sequence per step: scheduling, sampling bookkeeping, stops


class GemmCurve:
    """Achieved FLOP/s of x[M, K] @ w[K, N] as a function of M, from measured (m, k, n, rate) rows.

    Rows are grouped by (K, N); a query uses the group nearest in log(K*N). Within a group the
    rate is made non-decreasing in M by taking, at each M, the least rate measured at M or more:
    a lone fast outlier (cache luck, a noisy neighbour on the slower ones) must not make a
    mid-sized GEMM look faster than a large one. Between points: log-log interpolation; above the
    largest M: flat; below the smallest: the time per call of the smallest (rate proportional to
    M): a GEMM's weight read and fixed costs do not shrink with its rows, and CPU bf16 kernels can
    fall to a slow path at small M (here: 7 GFLOP/s at M=8 against 230 at M=256, the same ~16 ms
    per call). Without rows: peak * M / (M + half).
    """

    def __init__(self, peak_flops_per_s: float, rows=(), half_rate_tokens: float = 0.0):
        self.peak_flops_per_s = float(peak_flops_per_s)
        self.half_rate_tokens = float(half_rate_tokens)
        groups: dict[tuple[int, int], dict[int, float]] = {}
        for m, k, n, rate in rows:
            if rate > 0:
                best = groups.setdefault((int(k), int(n)), {})
                best[int(m)] = max(best.get(int(m), 0.0), float(rate))
        self.groups = {}
        for kn, by_m in groups.items():
            ms = sorted(by_m)
            env, low = [], math.inf
            for m in reversed(ms):
                low = min(low, by_m[m])
                env.append(low)
            self.groups[kn] = list(zip(ms, reversed(env)))
        self._cache: dict[tuple, float] = {}

    @property
    def top_flops_per_s(self) -> float:
        """The best rate the curve will ever give (outliers removed), for printing."""
        if not self.groups:
            return self.peak_flops_per_s
        return max(points[-1][1] for points in self.groups.values())

    def rate(self, m: float, k: int, n: int) -> float:
        key = (round(m, 3), k, n)
        if key not in self._cache:
            self._cache[key] = self._rate(max(m, 1e-9), k, n)
        return self._cache[key]

    def _rate(self, m: float, k: int, n: int) -> float:
        if not self.groups:
            if self.half_rate_tokens > 0:
                return self.peak_flops_per_s * m / (m + self.half_rate_tokens)
            return self.peak_flops_per_s
        size = math.log(max(k * n, 1))
        points = min(self.groups.items(), key=lambda it: (abs(math.log(it[0][0] * it[0][1]) - size), -it[0][0]))[1]
        if m >= points[-1][0]:
            return points[-1][1]
        if m <= points[0][0]:   # no faster per call than the fewest rows measured
            return points[0][1] * m / points[0][0]
        for (m0, r0), (m1, r1) in zip(points, points[1:]):
            if m0 <= m <= m1:
                t = math.log(m / m0) / math.log(m1 / m0)
                return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
        return points[-1][1]   # unreachable: the loop covers [first, last]


@dataclass
class Hardware:
    """Hardware constants. `device` is where GEMMs run: "cpu" (everything in host memory, no PCIe)
    or "cuda" (weights in pinned host memory, streamed over PCIe; KV cache in host memory).

    gemm_flops_per_s: peak (best measured) GEMM rate per dtype on `device`.
    gemm_shapes: per dtype, measured (m, k, n, flops_per_s) rows; the curve interpolates over M.
    gemm_half_rate_tokens: without rows, rows at which a GEMM reaches half its peak (0 = always
        peak; small-M slowness then comes only from the memory roofline).
    cpu_attention_gbps: KV GB/s the CPU decode attention reads (the probe's cpu_attention rate).
    cpu_flops_per_s: CPU GEMM rate, caps CPU attention by FLOPs (MLA's absorbed attention does
        many FLOPs per KV byte); 0 = bytes only.
    prefill_attention_flops_per_s: useful FLOP/s of prompt attention on the CPU; 0 = GEMM rate.
    elementwise_gbps: GB/s of the CPU's non-GEMM activation passes; 0 = not modelled.
    dequant_params_per_s: per quantized weight format ("fp8", "int8", "int4"), parameters per
        second the compute device dequantizes before a GEMM; a format absent = not modelled.
    fused_experts_shapes: per weight format ("bfloat16", "fp8", "int8", "int4"), measured (rows per
        expert, hidden, intermediate, flops_per_s) rows of the fused routed-experts kernel (CPU;
        moegen.ops.experts): a MoE layer's experts then cost their FLOPs at that rate and one
        dispatch per layer (quantized ones without a curve: bf16's plus their dequantization);
        absent = per-expert GEMMs. INT8_COMPUTE: the experts multiplied in int8 (experts_kernel=int8).
    disk_read_gbps: sequential read bandwidth of the checkpoint's filesystem (the probe's, past
        the page cache); 0 = unknown: plans keep every weight in host memory (no disk tier).
    """
    device: str = "cpu"
    gemm_flops_per_s: Mapping[str, float] = field(default_factory=dict)
    host_mem_bw_gbps: float = 0.0
    cpu_attention_gbps: float = 0.0
    h2d_gbps: float = 0.0
    d2h_gbps: float = 0.0
    device_mem_bw_gbps: float = 0.0
    device_memory_bytes: int = 0
    host_memory_bytes: int = 0
    gemm_shapes: Mapping[str, Any] = field(default_factory=dict)
    gemm_half_rate_tokens: float = 0.0
    cpu_flops_per_s: float = 0.0
    prefill_attention_flops_per_s: float = 0.0
    elementwise_gbps: float = 0.0
    dequant_params_per_s: Mapping[str, float] = field(default_factory=dict)
    fused_experts_shapes: Mapping[str, Any] = field(default_factory=dict)
    disk_read_gbps: float = 0.0
    op_overhead_s: float | None = None
    sync_overhead_s: float | None = None
    seq_overhead_s: float = SEQ_OVERHEAD_S
    source: str = "explicit"

    def __post_init__(self):
        kind = str(self.device).partition(":")[0]
        if kind not in ("cpu", "cuda"):
            raise ConfigError(f"hardware: device must be 'cpu' or 'cuda', not {self.device!r}")
        self.device = kind
        if isinstance(self.gemm_flops_per_s, (int, float)):
            self.gemm_flops_per_s = {d: float(self.gemm_flops_per_s) for d in ("float32", "bfloat16", "float16")}
        need = ["host_mem_bw_gbps", "cpu_attention_gbps"]
        if kind == "cuda":
            need += ["h2d_gbps", "device_mem_bw_gbps"]
        missing = [n for n in need if not getattr(self, n) or getattr(self, n) <= 0]
        if not any(v > 0 for v in self.gemm_flops_per_s.values()):
            missing.insert(0, "gemm_flops_per_s")
        if missing:
            raise ConfigError(f"hardware ({self.source}, device {kind}): {', '.join(missing)} must be > 0")
        if self.d2h_gbps <= 0:
            self.d2h_gbps = self.h2d_gbps
        if self.op_overhead_s is None:
            self.op_overhead_s = CUDA_OP_OVERHEAD_S if kind == "cuda" else CPU_OP_OVERHEAD_S
        if self.sync_overhead_s is None:
            self.sync_overhead_s = CUDA_SYNC_OVERHEAD_S if kind == "cuda" else 0.0
        self._curves: dict[str, GemmCurve] = {}

    # -- construction --

    @classmethod
    def from_probe(cls, result: Mapping[str, Any], **overrides) -> "Hardware":
        """From a probe() result (moegen.planner.probe); keyword overrides win."""
        def need(*keys):
            node = result
            for key in keys:
                if not isinstance(node, Mapping) or key not in node:
                    raise ConfigError(f"probe result: {'.'.join(keys)} is missing")
                node = node[key]
            return node

        device = str(need("device")).partition(":")[0]
        shapes = {}
        for dtype, r in (result.get("gemm") or {}).items():
            shapes[dtype] = tuple((s["m"], s["k"], s["n"], s.get("sustained_flops_per_s") or s["flops_per_s"])
                                  for s in r.get("shapes", ()) if "flops_per_s" in s and not s.get("calibration"))
        best = dict(need("gemm_best_flops_per_s"))
        kw = dict(device=device, gemm_flops_per_s=best, gemm_shapes=shapes,
                  host_mem_bw_gbps=float(need("host_mem_bw_gbps")),
                  cpu_attention_gbps=float(need("cpu_attention", "kv_gbps")),
                  host_memory_bytes=int(result.get("host_memory_bytes", 0)),
                  dequant_params_per_s=dict(result.get("dequant_params_per_s") or {}),
                  disk_read_gbps=float((result.get("disk_read") or {}).get("gbps", 0)),
                  source=f"probe {result.get('hostname', '?')}/{result.get('device', '?')}")
        if device == "cuda":
            kw.update(h2d_gbps=float(need("h2d_pinned_gbps")), d2h_gbps=float(result.get("d2h_pinned_gbps", 0)),
                      device_mem_bw_gbps=float(need("device_mem_bw_gbps")),
                      device_memory_bytes=int(result.get("gpu_memory_bytes", 0)))
        else:   # the CPU is the compute device: its GEMM rate also bounds attention FLOPs
            fused = result.get("fused_experts") or {}
            by_format: dict[str, list] = {}
            for r in fused.get("shapes") or []:
                by_format.setdefault(r.get("format", "bfloat16"), []).append(
                    (r["rows_per_expert"], r["hidden"], r["intermediate"], r["flops_per_s"]))
            if by_format:
                kw["fused_experts_shapes"] = {fmt: tuple(rows) for fmt, rows in by_format.items()}
            kw.update(cpu_flops_per_s=float(best.get("bfloat16") or max(best.values())),
                      prefill_attention_flops_per_s=float((result.get("cpu_prefill_attention") or {}).get("flops_per_s", 0)),
                      elementwise_gbps=float(result.get("elementwise_gbps") or 0))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("gemm_shapes", "fused_experts_shapes", "source")]

    def replace(self, **changes) -> "Hardware":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw.update(changes)
        return Hardware(**kw)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["gemm_shapes"] = {d: [list(r) for r in rows] for d, rows in self.gemm_shapes.items()}
        out["fused_experts_shapes"] = {d: [list(r) for r in rows] for d, rows in self.fused_experts_shapes.items()}
        return out

    # -- rates --

    def curve(self, dtype: str) -> GemmCurve:
        """The GEMM curve of dtype (fp8 and unknown dtypes fall back to bfloat16's)."""
        if dtype not in self._curves:
            name = dtype if self.gemm_flops_per_s.get(dtype, 0) > 0 else "bfloat16"
            if self.gemm_flops_per_s.get(name, 0) <= 0:
                name = max(self.gemm_flops_per_s, key=self.gemm_flops_per_s.get)
            self._curves[dtype] = GemmCurve(self.gemm_flops_per_s[name], self.gemm_shapes.get(name, ()),
                                            self.gemm_half_rate_tokens)
        return self._curves[dtype]

    def gemm_rate(self, dtype: str, m: float, k: int, n: int) -> float:
        return self.curve(dtype).rate(m, k, n)

    def fused_experts_rate(self, dtype: str, rows_per_expert: float, hidden: int, inter: int) -> float | None:
        """FLOP/s of the fused routed-experts kernel at this many rows per expert (the curve nearest
        in hidden x intermediate) for a weight format (bfloat16 or a quantized one), or None where
        it was not measured (GPU, other dtypes)."""
        rows = self.fused_experts_shapes.get(dtype)
        if not rows:
            return None
        key = f"fused:{dtype}"
        if key not in self._curves:
            self._curves[key] = GemmCurve(max(r[3] for r in rows), rows)
        return self._curves[key].rate(rows_per_expert, hidden, inter)

    def dequant_s(self, weight_format: str, params: float) -> float:
        """Time to dequantize `params` parameters of `weight_format` ("" = unquantized: 0)."""
        rate = self.dequant_params_per_s.get(weight_format, 0.0) if weight_format else 0.0
        return params / rate if rate > 0 else 0.0

    @property
    def weight_read_gbps(self) -> float:
        """Bandwidth at which the compute device reads weights (resident or freshly streamed)."""
        return self.device_mem_bw_gbps if self.device == "cuda" else self.host_mem_bw_gbps

