"""Where moegen's prefill and decode time goes, by kind of work: GEMMs, the fused routed-experts
kernel, attention, norms, RoPE, activation, routing, dispatch (gather/scatter around the experts), sampling and the rest.

    PYTHONPATH=. python benchmarks/profile_phases.py --model runs/fixtures/mixtral-bench [--n 512] [--prompt 128] [--gen 64]

The leaf functions of each kind are wrapped with a wall-clock timer (every module that imported
them sees the wrapper), so a kind's time is the time spent inside its calls; "other" is the phase's
time (engine.stats) less the kinds'. One warm-up call, then one timed `generate` of the synthetic
workload `moegen bench` uses. Timing adds a perf_counter pair per call (~1 µs; thousands of calls
per step), so the shares, not the absolute rates, are the point.
"""
import argparse
import json
import sys
import time
from collections import defaultdict

TOTALS = defaultdict(float)          # (phase, kind) -> seconds
PHASE = ["idle"]


def timed(kind, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[PHASE[0], kind] += time.perf_counter() - t0
    wrapper.__wrapped__ = fn
    return wrapper


def in_phase(step):
    """Engine.step(self, phase, batch, sampler) with PHASE set to its phase."""
    def wrapper(self, phase, *args, **kwargs):
        PHASE[0] = phase
        try:
            return step(self, phase, *args, **kwargs)
        finally:
            PHASE[0] = "idle"
    return wrapper


def patch_everywhere(fn, replacement) -> None:
    """Replace fn by replacement in every loaded moegen module that holds it by name (a function
    found nowhere would leave its time silently in "other": refused)."""
    holders = [(m, attr) for name, m in list(sys.modules.items()) if m is not None and name.startswith("moegen")
               for attr, value in list(vars(m).items()) if value is fn]
    if not holders:
        raise RuntimeError(f"{fn.__qualname__} is not held by any moegen module: the profile would miss it")
    for module, attr in holders:
        setattr(module, attr, replacement)


def instrument() -> None:
    from moegen.engine.llm_engine import Engine     # loads every module that imports the leaves
    from moegen.engine.sampler import Sampler
    from moegen.layers import attention, linear, mlp, moe, norm, rotary, router
    from moegen.ops import attention as attention_ops
    from moegen.ops import experts as experts_ops
    from moegen.ops import prefill_attention as prefill_ops
    functions = {"gemm": [linear.linear], "experts": [experts_ops.moe_experts], "norm": [norm.rms_norm],
                 "activation": [mlp.gated_activation],
                 "attention": [attention.causal_attention, prefill_ops.prefill_attention,
                               attention_ops.paged_decode_attention,
                               attention_ops.paged_decode_attention_mla]}
    for kind, fns in functions.items():
        for fn in fns:
            patch_everywhere(fn, timed(kind, fn))
    methods = {"rope": [(rotary.RotaryEmbedding, "apply"), (rotary.RotaryEmbedding, "cos_sin")],
               "routing": [(cls, "route") for cls in vars(router).values()
                           if isinstance(cls, type) and "route" in vars(cls)],
               "dispatch": [(moe.Dispatch, "from_routing"), (moe.Dispatch, "combine")],
               "sampling": [(Sampler, "sample")]}
    for kind, pairs in methods.items():
        for cls, name in pairs:
            original = vars(cls)[name]
            setattr(cls, name, classmethod(timed(kind, original.__func__)) if isinstance(original, classmethod)
                    else timed(kind, original))
    Engine.step = in_phase(Engine.step)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    from moegen.engine import Engine, SamplingParams
    from moegen.bench.workloads import parse_workload
    instrument()
    engine = Engine.from_pretrained(args.model, dtype=args.dtype)
    prompts = parse_workload(f"synthetic:prompt={args.prompt},gen={args.gen},n={args.n}", engine.tokenizer).prompts
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=2, ignore_eos=True))      # warm-up
    engine.reset_stats()
    TOTALS.clear()
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_new_tokens=args.gen, ignore_eos=True))
    wall = time.perf_counter() - t0
    stats = engine.stats
    phases = {"prefill": stats.prefill_s, "decode": stats.decode_s}
    rows = {}
    for phase, phase_s in phases.items():
        kinds = {kind: s for (p, kind), s in TOTALS.items() if p == phase}
        kinds["other"] = phase_s - sum(kinds.values())
        ranked = sorted(kinds.items(), key=lambda kv: -kv[1])
        rows[phase] = {"seconds": round(phase_s, 2), "kinds": {k: round(v, 2) for k, v in ranked}}
        print(f"{phase}: {phase_s:.1f} s -- " + ", ".join(f"{k} {v:.1f} s ({v / phase_s:.0%})" for k, v in ranked),
              flush=True)
    print(f"wall {wall:.1f} s (prefill + decode {sum(phases.values()):.1f} s), plan {dict(stats.plan.settings)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "n": args.n, "prompt": args.prompt, "gen": args.gen, "wall_s": wall,
                       "phases": rows, "settings": dict(stats.plan.settings)}, f, indent=1)


if __name__ == "__main__":
    main()
