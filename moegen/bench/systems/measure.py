"""Measures every system gets alike: peak memory while it runs, and its metrics dict.

The throughput, S-MFU/S-MBU and cost formulas live in moegen.bench.metrics; this module only feeds
them (model shape, the run's record, the hardware peaks) and adds memory and accuracy.
"""
from __future__ import annotations

import os
import threading

import psutil

from moegen.dtypes import parse_dtype
from moegen.engine.stats import PHASES, RunRecord
from moegen.bench.metrics import throughput_report
from moegen.planner.model_spec import ModelSpec
from moegen.bench.workloads import PromptSet, accuracy

SAMPLE_S = 0.02


def _tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and its children: some systems (vLLM) run their engine in a child."""
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:          # the child ended between listing and reading
            pass
    return total


class MemoryMonitor:
    """Peak host RSS (sampled by a thread every SAMPLE_S, since ru_maxrss never falls and so
    cannot tell one system's peak from the previous one's) and peak device memory on CUDA."""

    def __init__(self, device: str = "cpu"):
        self.device = str(device)
        self.cuda = self.device.startswith("cuda")
        self._proc = psutil.Process(os.getpid())
        self._stop = threading.Event()
        self.before = self.peak = 0
        self.device_peak = None

    def __enter__(self):
        self.before = self.peak = _tree_rss(self._proc)
        if self.cuda:
            import torch
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, name="moegen-rss", daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, _tree_rss(self._proc))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss(self._proc))
        if self.cuda:
            import torch
            self.device_peak = int(torch.cuda.max_memory_allocated(self.device))
        return False

    def result(self) -> dict:
        return {"rss_before_bytes": self.before, "peak_rss_bytes": self.peak,
                "peak_rss_delta_bytes": self.peak - self.before, "peak_device_bytes": self.device_peak}


def weights_bytes(weights: dict) -> int:
    """Host bytes a model's weights take as stored (quantized weights: their codes and scales;
    a packed weight: its oneDNN layout, the same size as the plain one)."""
    from moegen.layers.quantized import stored_bytes
    return sum(stored_bytes(w) for w in weights.values())


def footprint(weights_bytes_: int, kv_cache_bytes: int, peak_rss_bytes: int | None) -> dict:
    """The memory a run's peak RSS is judged against: peak RSS over the weights as stored, and
    over weights + KV cache (the two big allocations; activations and the runtime come on top)."""
    ratio = lambda d: peak_rss_bytes / d if peak_rss_bytes and d else None   # noqa: E731
    return {"weights_bytes": weights_bytes_, "kv_cache_bytes": kv_cache_bytes,
            "peak_rss_per_weights_bytes": ratio(weights_bytes_),
            "peak_rss_per_weights_kv_bytes": ratio(weights_bytes_ + kv_cache_bytes)}


def dtype_bytes(dtype: str) -> int:
    return parse_dtype(dtype).itemsize


def run_metrics(model, rec: RunRecord, dtype: str, peaks, usd_per_hour: float | None, workload: PromptSet,
                texts: list[str]) -> dict:
    """The flat metrics dict of one run. Every key is always present (None when unknown), so
    tables and databases see one schema whatever the system or the hardware."""
    spec = ModelSpec.from_config(getattr(model, "config", model))   # a ConfigModel carries its config
    size = dtype_bytes(dtype)
    peak_flops = peaks.flops_per_s if peaks else None
    peak_bw = peaks.bw_gbps if peaks else None
    report = throughput_report(spec, rec, peak_flops=peak_flops, peak_bw_gbps=peak_bw, dtype_bytes=size,
                               kv_dtype_bytes=size, usd_per_hour=usd_per_hour)
    for phase in PHASES:
        report.setdefault(f"{phase}_s_mfu", None)
        report.setdefault(f"{phase}_s_mbu", None)
    report.setdefault("usd_per_million_tokens", None)
    report.update(num_prompts=len(rec.prompt_lens), peak_flops_per_s=peak_flops, peak_bw_gbps=peak_bw,
                  peaks_source=peaks.source if peaks else None, usd_per_hour=usd_per_hour,
                  accuracy=None, correct=None)
    if workload.answers is not None:
        score = accuracy(texts, workload.answers)
        report.update(accuracy=score["accuracy"], correct=score["correct"])
    return report
