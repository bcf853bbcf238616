"""bf16 vs fp8 vs int8 vs int4 weights: host bytes, peak RSS, end-to-end tok/s, and the accuracy cost.

    PYTHONPATH=. python benchmarks/bench_quantized.py [--formats bf16,fp8,int8,int4] [--workload synthetic:prompt=128,gen=32,n=64]
                                         [--ppl-rows 100] [--json runs/bench_quantized.json]

Throughput: `moegen bench`'s own run (moegen.bench.run.run_bench, system moegen, bf16
activations) on the bench Mixtral fixture (runs/fixtures/mixtral-bench) and its quantized copies
(`moegen quantize`, cached beside it as mixtral-bench-<fmt>), each format in a fresh process so
that its peak RSS is its own: weights_bytes (as stored), peak_rss_bytes (sampled from before the
load to the end), their ratio, the KV cache allocated, e2e / prefill / decode tok/s.

Accuracy: GSM8K-text perplexity (question + "\\n" + answer, scored from the second token, float32
activations, Engine.loglikelihood as benchmarks/upcycle_perplexity.py does) of the trained-weight
fixture runs/fixtures/mixtral-smollm2 and its quantized copies. Its hidden size (576) is not a
multiple of 128, so its GPTQ copies use groups of --trained-group (64) or most weights would stay
unquantized.
"""
import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("bf16", "fp8", "int8", "int4")


def quantized_copy(src: Path, fmt: str, group_size: int) -> Path:
    """src itself for bf16, else its quantized copy (made once, beside it)."""
    if fmt == "bf16":
        return src
    from moegen.checkpoints.quantize import quantize_checkpoint
    dst = src.with_name(f"{src.name}-{fmt}" + (f"-g{group_size}" if fmt != "fp8" else ""))
    if not (dst / "config.json").is_file():
        t0 = time.perf_counter()
        quantize_checkpoint(src, dst.with_name(dst.name + ".partial"), fmt, group_size=group_size)
        dst.with_name(dst.name + ".partial").rename(dst)
        print(f"quantized {src} -> {dst} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return dst


def child_throughput(path: str, workload: str) -> dict:
    from moegen.bench.run import run_bench
    result = run_bench(path, ["moegen"], workload, dtype="bfloat16", probe="quick")
    system = result["systems"][0]
    if system["status"] != "ok":
        return {"status": system["status"], "reason": system["reason"]}
    keys = ("weight_format", "weights_bytes", "kv_cache_bytes", "rss_before_bytes", "peak_rss_bytes",
            "peak_rss_per_weights_bytes", "peak_rss_per_weights_kv_bytes", "load_s", "e2e_tokens_per_s",
            "prefill_tokens_per_s", "decode_tokens_per_s", "predicted_e2e_tokens_per_s")
    return {"status": "ok", **{k: system["metrics"].get(k) for k in keys}}


def child_perplexity(path: str, gsm8k: str, rows: int) -> dict:
    from moegen.engine import Engine, EngineConfig
    from moegen.loader import load_model
    from moegen.tokenizer import load_tokenizer
    tok = load_tokenizer(path)
    with open(Path(gsm8k) / "test.jsonl") as f:
        texts = [(lambda r: r["question"] + "\n" + r["answer"])(json.loads(line)) for line, _ in zip(f, range(rows))]
    seqs = [tok.encode(t) for t in texts]
    engine = Engine(load_model(path, "float32"), tok, EngineConfig(kv_cache_bytes=512 << 20))
    t0 = time.perf_counter()
    scores = engine.loglikelihood([(ids[:1], ids[1:]) for ids in seqs])
    nll = -sum(lp for lp, _ in scores)
    return {"perplexity": math.exp(nll / sum(len(ids) - 1 for ids in seqs)), "rows": rows,
            "scored_tokens": sum(len(ids) - 1 for ids in seqs), "s": time.perf_counter() - t0}


def in_child(*args) -> dict:
    """Run this script's child mode in a fresh process (its own peak RSS); its last line is JSON."""
    out = subprocess.run([sys.executable, __file__, "--child", *args], cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        return {"status": "failed", "reason": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(n) -> str:
    return f"{n / 2**30:.2f}" if n else "-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default="runs/fixtures/mixtral-bench", help="bf16 checkpoint for throughput")
    ap.add_argument("--trained", default="runs/fixtures/mixtral-smollm2", help="trained-weight checkpoint for perplexity")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--workload", default="synthetic:prompt=128,gen=32,n=64")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--trained-group", type=int, default=64)
    ap.add_argument("--gsm8k", default=str(REPO.parent / "shared/data/gsm8k"))
    ap.add_argument("--ppl-rows", type=int, default=100, help="GSM8K rows for perplexity (0: skip)")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, *rest = args.child
        row = child_throughput(*rest) if mode == "throughput" else child_perplexity(rest[0], rest[1], int(rest[2]))
        print(json.dumps(row))
        return
    rows = []
    print(f"throughput: {args.bench}, {args.workload}, bf16 activations\n")
    print("| format | weights GiB | KV GiB | peak RSS GiB | RSS / weights | RSS / (weights+KV) | load s | e2e tok/s | "
          "prefill tok/s | decode tok/s |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for fmt in args.formats.split(","):
        path = quantized_copy(Path(args.bench), fmt, args.group_size)
        r = in_child("throughput", str(path), args.workload)
        rows.append({"part": "throughput", "format": fmt, "path": str(path), **r})
        if r.get("status") != "ok":
            print(f"| {fmt} | {r.get('status')}: {r.get('reason')} |", flush=True)
            continue
        print(f"| {fmt} | {gib(r['weights_bytes'])} | {gib(r['kv_cache_bytes'])} | {gib(r['peak_rss_bytes'])} | "
              f"{r['peak_rss_per_weights_bytes']:.2f} | {r['peak_rss_per_weights_kv_bytes']:.2f} | {r['load_s']:.1f} | "
              f"{r['e2e_tokens_per_s']:.1f} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} |",
              flush=True)
    if args.ppl_rows:
        print(f"\nGSM8K-text perplexity, {args.trained}, first {args.ppl_rows} test rows, float32 activations\n")
        print("| format | perplexity | s |\n|---|---|---|", flush=True)
        for fmt in args.formats.split(","):
            path = quantized_copy(Path(args.trained), fmt, args.trained_group)
            r = in_child("perplexity", str(path), args.gsm8k, str(args.ppl_rows))
            rows.append({"part": "perplexity", "format": fmt, "path": str(path), **r})
            shown = f"{r['perplexity']:.4f} | {r['s']:.0f}" if "perplexity" in r else f"{r.get('status')}: {r.get('reason')} |"
            print(f"| {'unquantized (float32)' if fmt == 'bf16' else fmt} | {shown} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
