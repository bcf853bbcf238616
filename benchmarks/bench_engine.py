"""End-to-end generation throughput: moegen vs transformers `generate` (static batches), one run.

    python benchmarks/bench_engine.py --model runs/fixtures/mixtral-bench --n 256

Synthetic prompts of random token ids (fixed lengths, as FlexGen/MoE-Lightning measure),
--ignore-eos so every system generates exactly gen tokens per prompt. transformers runs one full
batch at each batch size (16/64/256 by default) and its best tokens/s is the baseline.
"""
import argparse
import json
import time

import torch


def synthetic_prompts(path, n: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """The `synthetic` workload of `moegen bench` (BOS + random ids), for the checkpoint at path."""
    from moegen.tokenizer import load_tokenizer
    from moegen.bench.workloads import parse_workload
    return parse_workload(f"synthetic:prompt={prompt_len},gen=1,n={n},seed={seed}", load_tokenizer(path)).prompts


def bench_moegen(path, prompts, gen: int, dtype: str, **engine_kw) -> dict:
    from moegen.engine import Engine, SamplingParams
    engine = Engine.from_pretrained(path, dtype=dtype, **engine_kw)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=gen, ignore_eos=True), progress=True)
    wall = time.perf_counter() - t0
    generated = sum(len(o.token_ids) for o in outs)
    s = engine.stats
    return {"system": "moegen", "sequences": len(prompts), "generated_tokens": generated, "wall_s": wall,
            "end_to_end_tok_s": generated / wall, "prefill_tok_s": s.prefill_tok_s, "decode_tok_s": s.decode_tok_s,
            "attention": s.attention, "max_batch": engine.config.max_batch}


@torch.inference_mode()
def bench_hf(path, prompts, gen: int, dtype: str, batch_sizes) -> list[dict]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    rows = []
    for bs in batch_sizes:
        batch = torch.tensor(prompts[:bs])       # equal lengths: no padding needed
        t0 = time.perf_counter()
        out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=gen, min_new_tokens=gen,
                             do_sample=False, pad_token_id=0)
        wall = time.perf_counter() - t0
        generated = (out.shape[1] - batch.shape[1]) * batch.shape[0]
        rows.append({"system": "hf-generate", "batch_size": len(batch), "generated_tokens": generated,
                     "wall_s": wall, "end_to_end_tok_s": generated / wall})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hf-batch-sizes", default="16,64,256")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--attn-micro-batch", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    prompts = synthetic_prompts(args.model, args.n, args.prompt_len)
    ours = bench_moegen(args.model, prompts, args.gen, args.dtype, max_batch=args.max_batch,
                        attn_micro_batch=args.attn_micro_batch)
    print(json.dumps(ours), flush=True)
    sizes = [int(b) for b in args.hf_batch_sizes.split(",") if int(b) <= args.n]
    hf = bench_hf(args.model, prompts, args.gen, args.dtype, sizes)
    best = max(hf, key=lambda r: r["end_to_end_tok_s"])
    result = {"moegen": ours, "hf_generate": hf, "hf_best_batch": best["batch_size"],
              "speedup_vs_hf_best": ours["end_to_end_tok_s"] / best["end_to_end_tok_s"],
              "threads": torch.get_num_threads()}
    print(f"moegen {ours['end_to_end_tok_s']:.1f} tok/s | transformers best (batch {best['batch_size']}) "
          f"{best['end_to_end_tok_s']:.1f} tok/s | ratio {result['speedup_vs_hf_best']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
