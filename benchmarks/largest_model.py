"""The largest model that runs on this machine: Qwen3-30B-A3B's shapes with fewer layers, sized
past what bf16 can hold here, run end to end with int8 and int4 weights made directly quantized.

    PYTHONPATH=. python benchmarks/largest_model.py [--layers 24] [--formats int8,int4] [--workload prompt=64,gen=16,n=32]
    PYTHONPATH=. python benchmarks/largest_model.py --smoke        # 2 layers, 16 experts: checks the script, not the machine

24 layers of Qwen3-30B-A3B (hidden 2048, 128 experts of width 768, top-8, 32/4 heads, vocab
151936) are 15.6 G parameters: 29 GiB in bf16, more than this 24 GiB machine, so bf16 is only
sized, never built. Each format runs in a fresh process (its own peak RSS): loader.dummy_model(...,
quantize=fmt) makes the GEMM weights as random GPTQ codes in place (no bf16 copy ever exists;
embeddings, lm_head and norms are bf16), then the engine generates `n` random-token prompts with
the planner's settings. Reported: weights as stored, peak RSS (ru_maxrss of that process, and of
the generation alone), tok/s (prefill, decode, end to end). It needs the whole machine: run it on
a quiet one.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = {"num_hidden_layers": 2, "num_experts": 16, "vocab_size": 4096}


def model_config(layers: int, smoke: bool) -> dict:
    from moegen.configs import load_config
    config = dict(load_config("qwen3-30b-a3b"))
    config["num_hidden_layers"] = layers
    config.pop("mlp_only_layers", None)
    if smoke:
        config.update(SMOKE)
    return config


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: KiB


def child(fmt: str, layers: int, smoke: bool, workload: dict) -> dict:
    import torch
    from moegen.engine import Engine, EngineConfig, SamplingParams
    from moegen.bench.systems.measure import weights_bytes
    from moegen.loader import dummy_model
    t0 = time.perf_counter()
    model = dummy_model(model_config(layers, smoke), "bfloat16", quantize=fmt)
    build_s, built_rss = time.perf_counter() - t0, peak_rss_bytes()
    engine = Engine(model, None, EngineConfig(kv_cache_bytes=workload["kv_gib"] << 30))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, model.vocab_size, (workload["n"], workload["prompt"]), generator=g).tolist()
    params = SamplingParams(max_new_tokens=workload["gen"], ignore_eos=True)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))      # warm-up
    engine.reset_stats()
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    rec = engine.stats.record(wall)
    return {"format": fmt, "layers": layers, "params": model.num_parameters(), "weights_bytes": weights_bytes(model.weights),
            "build_s": build_s, "rss_after_build_bytes": built_rss, "peak_rss_bytes": peak_rss_bytes(),
            "settings": dict(engine.stats.plan.settings), "wall_s": wall,
            "e2e_tokens_per_s": rec.generated_tokens / wall,
            "prefill_tokens_per_s": rec.prompt_tokens / rec.prefill_s if rec.prefill_s else None,
            "decode_tokens_per_s": rec.decode_tokens / rec.decode_s if rec.decode_s else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--formats", default="int8,int4")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--kv-gib", type=int, default=1, help="KV cache budget")
    ap.add_argument("--smoke", action="store_true", help="a tiny model of the same kind, to check the script")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    workload = {"prompt": args.prompt, "gen": args.gen, "n": args.n, "kv_gib": args.kv_gib}
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.smoke, workload)))
        return
    from moegen.planner.model_spec import ModelSpec
    spec = ModelSpec.from_config(model_config(args.layers, args.smoke))
    print(f"Qwen3-30B-A3B shapes, {spec.num_layers} layers{' (smoke)' if args.smoke else ''}: "
          f"{spec.total_params() / 1e9:.2f} G params, bf16 {spec.weight_bytes(2)['total'] / 2**30:.1f} GiB "
          f"(not built); workload {workload}\n")
    print("| format | weights GiB | peak RSS GiB | RSS / weights | build s | G | prefill tok/s | decode tok/s | "
          "e2e tok/s |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for fmt in args.formats.split(","):
        cmd = [sys.executable, __file__, "--child", fmt, "--layers", str(args.layers), "--prompt", str(args.prompt),
               "--gen", str(args.gen), "--n", str(args.n), "--kv-gib", str(args.kv_gib)] + (["--smoke"] if args.smoke else [])
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if out.returncode:
            tail = out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode} (killed for memory?)"]
            print(f"| {fmt} | failed: {tail[0]} |", flush=True)
            rows.append({"format": fmt, "status": "failed", "reason": tail[0]})
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        fmt_rate = lambda v: f"{v:.1f}" if v else "-"   # noqa: E731
        print(f"| {fmt} | {r['weights_bytes'] / 2**30:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
              f"{r['peak_rss_bytes'] / r['weights_bytes']:.2f} | {r['build_s']:.0f} | {r['settings']['max_batch']} | "
              f"{fmt_rate(r['prefill_tokens_per_s'])} | {fmt_rate(r['decode_tokens_per_s'])} | "
              f"{fmt_rate(r['e2e_tokens_per_s'])} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
