"""System `moegen`: our engine, module-based batching, with its planned settings.

Options pass straight through to Engine.from_pretrained. Those left None are the engine's choice:
G, A and the prefill token budget come from its planner per generate() call (the warm-up pays
for a first probe of the machine), and the run reports the settings used and, when the planner
chose them, its predicted throughput beside the measured one.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from moegen.harness.systems.base import Generation, System
from moegen.harness.workloads import Workload

ENGINE_OPTIONS = ("max_batch", "attn_micro_batch", "max_prefill_tokens", "expert_chunk", "streaming",
                  "num_buffers", "host_memory", "device_memory")


def settings_used(engine) -> dict:
    """G, A and the prefill budget of the last generate(): fixed in the config, else planned,
    else the engine's fallback (the engine keeps only the plan, so this mirrors Engine.settings)."""
    from moegen.engine.llm_engine import FALLBACK_PLAN, PLANNED
    plan = getattr(engine, "last_plan", None)
    chosen = {k: getattr(plan[0], k) for k in PLANNED} if plan else dict(FALLBACK_PLAN)
    return {**chosen, **{k: getattr(engine.config, k) for k in PLANNED if getattr(engine.config, k) is not None}}


def predicted(engine) -> dict:
    """The planner's predicted rates for the last generate() (None when nothing was planned)."""
    plan = getattr(engine, "last_plan", None)
    p = plan[1] if plan else None
    return {"predicted_prefill_tokens_per_s": p.prefill_tokens_per_s if p else None,
            "predicted_decode_tokens_per_s": p.decode_tokens_per_s if p else None,
            "predicted_e2e_tokens_per_s": p.e2e_tokens_per_s if p else None,
            "predicted_bound": p.bound if p else None}


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
    options = dict.fromkeys(ENGINE_OPTIONS)

    def engine_overrides(self, options: dict) -> dict:
        """Engine keyword arguments from this system's options (None = engine default)."""
        return {k: v for k, v in options.items() if v is not None}

    def load(self, model_path, dtype, device, workload: Workload, **options):
        from moegen.engine import Engine
        kwargs = self.engine_overrides(options)
        if isinstance(model_path, ConfigModel):
            return Engine.from_config(model_path.config, device=device, dtype=dtype, **kwargs)
        return Engine.from_pretrained(model_path, device=device, dtype=dtype, **kwargs)

    def generate(self, engine, workload: Workload) -> Generation:
        from moegen.engine import SamplingParams
        params = SamplingParams(max_new_tokens=workload.max_new_tokens, ignore_eos=workload.ignore_eos)
        engine.reset_stats()
        t0 = time.perf_counter()
        outs = engine.generate(workload.prompts, params)
        wall = time.perf_counter() - t0
        s = engine.stats
        extra = {"prefill_steps": s.prefill_steps, "decode_steps": s.decode_steps, "experts_run": s.experts_run,
                 "experts_skipped": s.experts_skipped, "weight_bytes_moved": engine.streamer.stats.bytes_moved,
                 **predicted(engine)}
        config = {"engine": asdict(engine.config), "settings": settings_used(engine), "attention": s.attention,
                  "planned": getattr(engine, "last_plan", None) is not None}
        return Generation([o.token_ids for o in outs], engine.run_record(outs, wall), [o.text for o in outs],
                          extra, config)
