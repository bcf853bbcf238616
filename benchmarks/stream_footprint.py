"""Host footprint of CUDA weight streaming: DeepSeek-V2-Lite shapes (dummy weights), bf16 vs fp8.

    PYTHONPATH=. python benchmarks/stream_footprint.py [--formats bf16,fp8] [--device-memory 16GiB] [--prompt 512 --gen 256 --n 256]
    PYTHONPATH=. python benchmarks/stream_footprint.py --device cpu --streaming staged --layers 2 --n 4 --prompt 16 --gen 4   # smoke

Each format in a fresh process: the model is made in host memory (fp8: each GEMM weight drawn
and block-quantized on its own), the engine pins it once for streaming (weight_stream.pin_weights)
and generates. Reported: weights as stored, peak host RSS (ru_maxrss) and its ratio to the
weights (goal <= 1.2; 97 GB for a 31 GB model before pinning went in place, i.e. 3.1), tok/s
(351 tok/s end to end measured for bf16 before, same shape and budget). Needs a GPU.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args) -> dict:
    import torch
    from moegen.configs import load_config
    from moegen.engine import Engine, SamplingParams
    from moegen.engine.config import engine_config
    from moegen.bench.systems.measure import weights_bytes
    from moegen.loader import dummy_model
    config = dict(load_config("deepseek-v2-lite"))
    if args.layers:
        config["num_hidden_layers"] = args.layers
    model = dummy_model(config, "bfloat16", quantize=None if args.format == "bf16" else args.format)
    overrides = {"streaming": args.streaming} if args.streaming else {}
    engine = Engine(model, None, engine_config(args.device, args.kv_gib << 30, args.device_memory, overrides))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, model.vocab_size, (args.n, args.prompt), generator=g).tolist()
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.reset_stats()
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_new_tokens=args.gen, ignore_eos=True))
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    wb = weights_bytes(model.weights)
    return {"format": args.format, "weights_bytes": wb, "peak_rss_bytes": rss, "rss_per_weights": rss / wb,
            "e2e_tokens_per_s": args.n * args.gen / wall, "wall_s": wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="bf16,fp8")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--device-memory", default="16GiB")
    ap.add_argument("--streaming", default=None, help="engine streaming mode (default: the device's)")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers (smoke runs)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--kv-gib", type=int, default=24)
    ap.add_argument("--format", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.format:
        print(json.dumps(child(args)))
        return
    print("| format | weights GiB | peak RSS GiB | RSS / weights | e2e tok/s |\n|---|---|---|---|---|", flush=True)
    for fmt in args.formats.split(","):
        cmd = [sys.executable, __file__, "--format", fmt] + [a for a in sys.argv[1:] if a != "--formats"
                                                            and a != args.formats]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if out.returncode:
            print(f"| {fmt} | failed: {(out.stderr.strip().splitlines() or ['?'])[-1]} |", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {fmt} | {r['weights_bytes'] / 2**30:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
              f"{r['rss_per_weights']:.2f} | {r['e2e_tokens_per_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
