"""System `moegen`: our engine, module-based batching, with its planned settings.

Options are the engine's (moegen.engine.options) and pass through to Engine.from_pretrained, text
values ("8", "staged") read as their kind; those left None are the engine's choice:
G, A and the prefill token budget come from its planner per generate() call (the warm-up pays
for a first probe of the machine), and the run reports the settings used and, when the planner
chose them, its predicted throughput beside the measured one.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from moegen.engine.options import engine_option_names, parse_options
from moegen.recipe import EngineRecipe
from moegen.bench.systems.base import Generation, RunResult, System
from moegen.bench.workloads import PromptSet


def settings_used(engine) -> dict:
    """G, A and the prefill budget of the last generate(): fixed in the config, else planned,
    else the engine's fallback (as the engine recorded them)."""
    return dict(engine.stats.plan.settings)


def predicted(engine) -> dict:
    """The planner's predicted rates for the last generate() (None when nothing was planned)."""
    p = engine.stats.plan.prediction
    return {"predicted_prefill_tokens_per_s": p.prefill_tokens_per_s if p else None,
            "predicted_decode_tokens_per_s": p.decode_tokens_per_s if p else None,
            "predicted_e2e_tokens_per_s": p.e2e_tokens_per_s if p else None,
            "predicted_bound": p.bound if p else None}


def disk_figures(engine, wall_s: float, generated: int) -> dict:
    """The disk tier's share of a run: bytes read; the disk bound (tokens/s if reading them at the
    disk's measured bandwidth were all the run did); the compute bound (tokens/s of the run's time
    not spent waiting for reads); and the share of min(both) the run achieved."""
    read = engine.streamer.disk_bytes_read
    out = {"disk_bytes_read": read}
    gbps = getattr(getattr(engine.planner, "hardware", None), "disk_read_gbps", 0) if read else 0
    if not gbps or wall_s <= 0:
        return out
    disk_bound = generated / (read / (gbps * 1e9))
    compute_bound = generated / max(wall_s - engine.streamer.disk_wait_s, 1e-9)
    return {**out, "disk_read_gbps": gbps, "disk_wait_s": engine.streamer.disk_wait_s,
            "disk_bound_tokens_per_s": disk_bound, "compute_bound_tokens_per_s": compute_bound,
            "bound_share": generated / wall_s / min(disk_bound, compute_bound)}


def memory_of(engine) -> dict:
    """Host bytes of the engine's weights as stored, their format, and its allocated KV cache."""
    from moegen.dtypes import dtype_name
    from moegen.bench.systems.measure import weights_bytes
    weights, cache = engine.model.weights, engine.cache
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer) if cache is not None else 0
    formats = sorted({w.format for w in weights.values() if hasattr(w, "tensors")})
    return {"weights_bytes": weights_bytes(weights), "kv_cache_bytes": kv,
            "weight_format": ",".join(formats) or dtype_name(engine.model.dtype)}


@dataclass(frozen=True)
class ConfigModel:
    """A model named by its config alone, to be run with dummy (random) weights: only systems
    that can build a model from a config run it (moegen, once Engine.from_config exists)."""
    name: str
    config: dict


class MoegenSystem(System):
    name = "moegen"
    description = "moegen engine: module-based batching (global batch G, attention micro-batch A)"
    is_moegen = True
    options = dict.fromkeys(engine_option_names())

    def engine_overrides(self, options: dict) -> dict:
        """Engine keyword arguments from this system's options (None = engine default)."""
        return parse_options(options)

    def load(self, model_path, dtype, device, workload: PromptSet, **options):
        dummy = isinstance(model_path, ConfigModel)
        settings = {**self.engine_overrides(options), "dtype": dtype, "device": device}
        return EngineRecipe(model_path.config if dummy else model_path, dummy, settings).build()

    def run(self, model_path, workload: PromptSet, *args, **kw) -> RunResult:
        """System.run, plus the footprint: peak RSS over the weights as stored (and over weights
        + KV cache)."""
        from moegen.bench.systems.measure import footprint
        result = super().run(model_path, workload, *args, **kw)
        m = result.metrics
        if "weights_bytes" in m:
            m.update(footprint(m["weights_bytes"], m["kv_cache_bytes"], m.get("peak_rss_bytes")))
        return result

    def generate(self, engine, workload: PromptSet) -> Generation:
        from moegen.engine import SamplingParams
        params = SamplingParams(max_new_tokens=workload.max_new_tokens, ignore_eos=workload.ignore_eos)
        engine.reset_stats()
        t0 = time.perf_counter()
        outs = engine.generate(workload.prompts, params)
        wall = time.perf_counter() - t0
        s = engine.stats
        extra = {**s.as_dict(("prefill_steps", "decode_steps", "experts_run", "experts_skipped")),
                 "weight_bytes_moved": engine.streamer.stats.bytes_moved,
                 **s.as_dict(("prompt_tokens_computed", "prefix_hit_rate")),
                 **disk_figures(engine, wall, sum(len(o.token_ids) for o in outs)),
                 **predicted(engine), **memory_of(engine)}
        config = {"engine": asdict(engine.config), "settings": settings_used(engine), "attention": s.attention,
                  "planned": engine.stats.plan.plan is not None}
        return Generation([o.token_ids for o in outs], engine.stats.record(wall), [o.text for o in outs],
                          extra, config)
