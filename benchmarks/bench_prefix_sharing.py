"""Prefix sharing on vs off, one process, one model: the three workloads of issue #16.

    PYTHONPATH=. python benchmarks/bench_prefix_sharing.py --model runs/fixtures/mixtral-bench [--json out.json]
    PYTHONPATH=. python benchmarks/bench_prefix_sharing.py --model runs/fixtures/mixtral-bench --limit 4   # smoke

- mc: lm-eval's gsm8k_mc_local (5-shot, 4 choices per question) through the moegen lm-eval
  backend over the test questions (all 1,319 unless --limit): wall time, accuracy.
- fewshot: 5-shot GSM8K generation with one fixed example set (the first 5 train rows) in front
  of every question, --fewshot-questions questions (256), 64 new tokens, EOS ignored: end to end.
- samples: n=8 sampled continuations of --sample-prompts GSM8K questions (64), 64 new tokens:
  with sharing, one engine call with SamplingParams(n=8) (one prefill per prompt, samples forked);
  without, today's way, every prompt repeated 8 times with sharing off. Prefill work ratio.

Each part runs sharing off, then on, on fresh engines over the same loaded weights (bf16 by
default); every line gives wall time, prompt tokens asked for and computed, and the hit rate.
"""
import argparse
import gc
import json
import time

from moegen.eval.tasks.gsm8k_data import read_split

FEWSHOT = 5
SAMPLES = 8


def engine_for(model, tokenizer, defaults, planner, sharing: bool):
    """A fresh engine (its own KV cache) over the loaded weights, warmed up: the planner's probe
    (shared, measured once) and the first GEMMs stay out of the timed runs."""
    from moegen.engine import Engine, EngineConfig, SamplingParams
    engine = Engine(model, tokenizer, EngineConfig(prefix_caching=sharing), planner=planner,
                    generation_defaults=defaults)
    engine.generate([[1, 415, 2936]], SamplingParams(max_new_tokens=2))
    engine.reset_stats()
    return engine


def work(engine, wall_s: float, **extra) -> dict:
    s = engine.stats
    return {"wall_s": round(wall_s, 2), "prompt_tokens": s.prefill_tokens, "prompt_tokens_computed":
            s.prompt_tokens_computed, "prefix_hit_rate": round(s.prefix_hit_rate, 4),
            "prefill_s": round(s.prefill_s, 2), "decode_s": round(s.decode_s, 2), **extra}


def run_mc(engine, limit: int | None) -> dict:
    from moegen.eval.run import evaluate, include_paths, task_manager
    from moegen.eval.lm_eval_backend import MoegenLM
    manager = task_manager(["gsm8k_mc_local"], include_paths(None))
    result = evaluate(MoegenLM(engine=engine), ["gsm8k_mc_local"], manager, limit=limit)
    accuracy = result["results"]["gsm8k_mc_local"]["acc,none"]
    return work(engine, result["wall_s"], accuracy=accuracy)


def fewshot_prompts(n: int) -> list[str]:
    """One fixed 5-shot example set (the first train rows) before each of the first n questions,
    in gsm8k_local's format."""
    shots = "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in read_split("train")[:FEWSHOT])
    return [f"{shots}\n\nQuestion: {r['question']}\nAnswer:" for r in read_split("test")[:n]]


def run_fewshot(engine, n: int, gen: int) -> dict:
    from moegen.engine import SamplingParams
    prompts = fewshot_prompts(n)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=gen, ignore_eos=True))
    wall = time.perf_counter() - t0
    generated = sum(len(o.token_ids) for o in outs)
    return work(engine, wall, e2e_tokens_per_s=round(generated / wall, 1))


def run_samples(engine, n: int, gen: int, sharing: bool) -> dict:
    from moegen.engine import SamplingParams
    prompts = [f"Question: {r['question']}\nAnswer:" for r in read_split("test")[:n]]
    sampled = dict(max_new_tokens=gen, temperature=0.8, top_p=0.95, seed=0, ignore_eos=True)
    t0 = time.perf_counter()
    if sharing:
        outs = engine.generate(prompts, SamplingParams(n=SAMPLES, **sampled))
        generated = sum(len(s.token_ids) for o in outs for s in o.samples)
    else:       # without n: each prompt SAMPLES times, each computed
        outs = engine.generate([p for p in prompts for _ in range(SAMPLES)], SamplingParams(**sampled))
        generated = sum(len(o.token_ids) for o in outs)
    wall = time.perf_counter() - t0
    return work(engine, wall, e2e_tokens_per_s=round(generated / wall, 1))


def compare(name: str, off: dict, on: dict) -> dict:
    row = {"workload": name, "off": off, "on": on, "speedup": round(off["wall_s"] / on["wall_s"], 2),
           "prefill_work_ratio": round(off["prompt_tokens_computed"] / max(on["prompt_tokens_computed"], 1), 2)}
    print(f"{name}: off {off['wall_s']} s, on {on['wall_s']} s: {row['speedup']}x faster; prefill work "
          f"{off['prompt_tokens_computed']} -> {on['prompt_tokens_computed']} tokens ({row['prefill_work_ratio']}x "
          f"less), hit rate {on['prefix_hit_rate']:.1%}" + (f"; accuracy off {off['accuracy']:.4f} on "
                                                            f"{on['accuracy']:.4f}" if "accuracy" in on else ""),
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--parts", default="mc,fewshot,samples")
    ap.add_argument("--limit", type=int, help="a smoke run: this many questions / prompts in every part")
    ap.add_argument("--fewshot-questions", type=int, default=256)
    ap.add_argument("--sample-prompts", type=int, default=64)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    from moegen.engine.params import GenerationDefaults
    from moegen.loader import load_model
    from moegen.planner.measured import MeasuredPlanner
    from moegen.tokenizer import load_tokenizer
    model, tokenizer = load_model(args.model, args.dtype), load_tokenizer(args.model)
    defaults, planner = GenerationDefaults.read(args.model), MeasuredPlanner("cpu")
    runs = {"mc": lambda e, sharing: run_mc(e, args.limit),
            "fewshot": lambda e, sharing: run_fewshot(e, args.limit or args.fewshot_questions, args.gen),
            "samples": lambda e, sharing: run_samples(e, args.limit or args.sample_prompts, args.gen, sharing)}
    rows = []
    for part in args.parts.split(","):
        measured = {}
        for sharing in (False, True):
            engine = engine_for(model, tokenizer, defaults, planner, sharing)
            measured[sharing] = runs[part](engine, sharing)
            del engine
            gc.collect()              # one KV cache at a time
        rows.append(compare(part, measured[False], measured[True]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "limit": args.limit, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
