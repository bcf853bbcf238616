"""What every system under test shares: the result type and the load / warm up / time loop.

A system subclasses `System` and implements `load` (build the model once) and `generate` (one
timed pass over the whole workload). `System.run` does the rest the same way for all of them, so
no system measures itself differently: options checked, memory watched from before the load to
after the last pass, a short untimed warm-up, `repeat` timed passes of which the median (by
end-to-end tokens/s) is reported, and every metric computed by moegen.bench.metrics.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

from moegen.errors import InputError, MoegenError
from moegen.engine.stats import RunRecord
from moegen.bench.metrics import decode_tokens_per_s, e2e_tokens_per_s, prefill_tokens_per_s
from moegen.bench.workloads import PromptSet


class SystemFailedError(MoegenError):
    """A system under test failed while generating (its own error is in the message)."""


@dataclass
class Generation:
    """One timed pass over a workload. `record` carries the lengths and the prefill/decode/wall
    split; `extra` holds measures only this system has (its metrics) and `config` what it chose."""
    token_ids: list
    record: RunRecord
    texts: list | None = None
    extra: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


@dataclass
class RunResult:
    system: str
    token_ids: list            # per prompt, the generated ids (empty lists when skipped)
    texts: list
    metrics: dict
    config: dict
    skipped_reason: str | None = None


def skipped(name: str, reason: str, config: dict | None = None) -> RunResult:
    return RunResult(name, [], [], {}, config or {}, skipped_reason=reason)


class System:
    """Base of the systems under test. Subclasses set `name`, `options` (name -> default) and
    implement load() and generate()."""

    name = "?"
    description = ""
    is_moegen = False          # our engine (ratios are taken against the first system that is not)
    exact = True               # greedy tokens must equal the reference's exactly in float32
    options: dict[str, Any] = {}

    # -- to implement ---------------------------------------------------------------------------
    def skip_reason(self, model_path, device: str) -> str | None:
        """Why this system cannot run here (None = it can)."""
        return None

    def load(self, model_path, dtype: str, device: str, workload: PromptSet, **options) -> Any:
        raise NotImplementedError

    def generate(self, handle, workload: PromptSet) -> Generation:
        raise NotImplementedError

    def close(self, handle) -> None:
        """Drop what load() built (the next system needs the memory)."""

    # -- shared ---------------------------------------------------------------------------------
    def check_options(self, options: dict) -> dict:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise InputError(f"system {self.name}: unknown option(s) {', '.join(unknown)}; known: {known}")
        return {**self.options, **options}

    def run(self, model_path, workload: PromptSet, dtype: str = "bfloat16", device: str = "cpu", *,
            repeat: int = 1, warmup: bool = True, peaks=None, usd_per_hour: float | None = None,
            **options) -> RunResult:
        """Load, warm up, generate `repeat` times; metrics of the median pass. `peaks`
        (moegen.bench.systems.peaks.Peaks) enables S-MFU/S-MBU; `usd_per_hour` the cost per token."""
        from moegen.bench.systems.measure import MemoryMonitor, run_metrics

        options = self.check_options(options)
        if repeat < 1:
            raise InputError(f"repeat must be >= 1, got {repeat}")
        reason = self.skip_reason(model_path, device)
        if reason:
            return skipped(self.name, reason, {"options": options})
        release_memory(device)            # the previous system's leftovers are not ours to count
        with MemoryMonitor(device) as memory:
            t0 = time.perf_counter()
            handle = self.load(model_path, dtype, device, workload, **options)
            load_s = time.perf_counter() - t0
            try:
                if warmup:                # thread pools, kernel choice, lazy builds: not timed
                    self.generate(handle, workload.head(1, max_new_tokens=min(2, workload.max_new_tokens)))
                passes = [self._checked(self.generate(handle, workload), workload) for _ in range(repeat)]
            finally:
                self.close(handle)
                del handle
                release_memory(device)
        rates = [e2e_tokens_per_s(p.record.generated_tokens, p.record.total_s) for p in passes]
        chosen = passes[sorted(range(repeat), key=rates.__getitem__)[repeat // 2]]   # the median pass
        texts = chosen.texts if chosen.texts is not None else [""] * len(chosen.token_ids)
        metrics = run_metrics(model_path, chosen.record, dtype, peaks, usd_per_hour, workload, texts)
        metrics.update(load_s=load_s, **pass_rates(passes), **memory.result(), **chosen.extra)
        config = {"dtype": dtype, "device": device, "repeat": repeat, "warmup": warmup, "options": options,
                  **chosen.config}
        return RunResult(self.name, chosen.token_ids, texts, metrics, config)

    def _checked(self, gen: Generation, workload: PromptSet) -> Generation:
        if len(gen.token_ids) != workload.num_prompts:
            raise SystemFailedError(f"{self.name} returned {len(gen.token_ids)} outputs for "
                                    f"{workload.num_prompts} prompts")
        return gen


def pass_rates(passes: list[Generation]) -> dict[str, list[float]]:
    """`repeats_<phase>_tokens_per_s`: every timed pass's rate per phase. The nightly check reads
    the spread of each (a phase can be noisier than the end-to-end figure) as this run's noise."""
    records = [p.record for p in passes]
    return {"repeats_e2e_tokens_per_s": [e2e_tokens_per_s(r.generated_tokens, r.total_s) for r in records],
            "repeats_prefill_tokens_per_s": [prefill_tokens_per_s(r.prompt_tokens, r.prefill_s) for r in records],
            "repeats_decode_tokens_per_s": [decode_tokens_per_s(r.decode_tokens, r.decode_s) for r in records]}


def release_memory(device: str) -> None:
    """Hand freed memory back, so the next system's peak is its own: torch keeps freed CUDA blocks
    and freed *pinned host* blocks (a CUDA engine's KV cache) cached for reuse."""
    gc.collect()
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


def cut_after_eos(ids: list[int], eos: set[int], ignore_eos: bool) -> list[int]:
    """Generated ids up to and including the first EOS (what moegen returns), unless ignored."""
    if not ignore_eos:
        for i, t in enumerate(ids):
            if t in eos:
                return ids[:i + 1]
    return ids
