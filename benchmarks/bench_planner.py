"""The planner's predicted throughput against the engine's measured one, for several (G, A).

    python benchmarks/bench_planner.py --model runs/fixtures/mixtral-bench

One engine (weights loaded and packed once) runs synthetic prompts of --prompt-len tokens, each
setting "G:A:N" with N sequences generating --gen tokens (EOS ignored); the prefill budget is
left to the planner, which therefore predicts every run. Prints one line per setting and the
largest error; --json writes them.
"""
import argparse
import json
import time

from bench_engine import synthetic_prompts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--settings", default="512:0:512,128:16:256,64:32:256",
                    help="comma-separated G:A:N (A 0 = all sequences in one attention micro-batch)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json")
    args = ap.parse_args()
    from moegen.engine import Engine, SamplingParams
    engine = Engine.from_pretrained(args.model, dtype=args.dtype)
    rows = []
    for setting in args.settings.split(","):
        g, a, n = (int(x) for x in setting.split(":"))
        engine.config.max_batch, engine.config.attn_micro_batch = g, a
        prompts = synthetic_prompts(args.model, n, args.prompt_len, seed=n + g)
        engine.reset_stats()
        t0 = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_new_tokens=args.gen, ignore_eos=True))
        wall = time.perf_counter() - t0
        s = engine.stats
        plan, pred = s.plan.plan, s.plan.prediction
        row = {"G": g, "A": a, "sequences": n, "prefill_budget": plan.max_prefill_tokens,
               "measured_e2e_tok_s": n * args.gen / wall, "measured_prefill_tok_s": s.prefill_tok_s,
               "measured_decode_tok_s": s.decode_tok_s, "predicted_e2e_tok_s": pred.e2e_tokens_per_s,
               "predicted_prefill_tok_s": pred.prefill_tokens_per_s, "predicted_decode_tok_s": pred.decode_tokens_per_s,
               "bound": pred.bound}
        row["error"] = row["predicted_e2e_tok_s"] / row["measured_e2e_tok_s"] - 1
        rows.append(row)
        print(f"G={g} A={a or 'all'} n={n}: measured {row['measured_e2e_tok_s']:.0f} e2e tok/s (prefill "
              f"{s.prefill_tok_s:.0f}, decode {s.decode_tok_s:.0f}); predicted {pred.e2e_tokens_per_s:.0f} (prefill "
              f"{pred.prefill_tokens_per_s:.0f}, decode {pred.decode_tokens_per_s:.0f}, {pred.bound}-bound): "
              f"{row['error']:+.0%}", flush=True)
    print(f"largest error: {max(abs(r['error']) for r in rows):.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
