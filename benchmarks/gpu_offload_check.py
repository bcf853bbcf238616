"""GPU: a model larger than the device budget, moegen vs transformers + accelerate offload.

DeepSeek-V2-Lite's shapes (about 31 GB in bfloat16) with random weights, a device budget of
16 GiB, prompt 512 / gen 256, greedy with EOS ignored. Steps (each fits one device call):

    PYTHONPATH=. python benchmarks/gpu_offload_check.py prepare --ckpt /tmp/v2lite
    PYTHONPATH=. python benchmarks/gpu_offload_check.py run --ckpt /tmp/v2lite --system moegen --n 512 --out a.json
    PYTHONPATH=. python benchmarks/gpu_offload_check.py run --ckpt /tmp/v2lite --system hf-offload --n 64 --out b.json
"""
import argparse
import json
import time

import torch


def prepare(ckpt: str, config: str) -> None:
    from transformers import AutoModelForCausalLM
    from moegen.loader import config_from
    cfg = config_from(config)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):           # random init on the GPU is fast; saving moves it to disk
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(ckpt, max_shard_size="4GB")
    print(json.dumps({"ckpt": ckpt, "params": sum(p.numel() for p in model.parameters()),
                      "prepare_s": time.perf_counter() - t0}))


def run(ckpt: str, system: str, n: int, prompt_len: int, gen: int, device_memory: str, out: str, options) -> None:
    from moegen.planner.probe import probe
    from moegen.bench.systems import get_system
    from moegen.bench.systems.peaks import probed_peaks
    from moegen.bench.workloads import PromptSet
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 100000, (prompt_len - 1,), generator=g).tolist() for _ in range(n)]
    wl = PromptSet(f"synthetic:prompt={prompt_len},gen={gen},n={n}", prompts, gen, True, None, "synthetic")
    hw = probe("cuda")
    peaks = probed_peaks(hw, "cuda", "bfloat16")
    result = get_system(system).run(ckpt, wl, "bfloat16", "cuda", warmup=False, peaks=peaks,
                                    device_memory=device_memory, **options)
    row = {"system": system, "n": n, "prompt_len": prompt_len, "gen": gen, "device_memory": device_memory,
           "metrics": result.metrics, "config": result.config, "skipped": result.skipped_reason,
           "probe": {k: hw.get(k) for k in ("gemm_best_flops_per_s", "h2d_pinned_gbps", "d2h_pinned_gbps",
                                            "device_mem_bw_gbps", "host_mem_bw_gbps")},
           "first_tokens": [t[:8] for t in result.token_ids[:4]] if result.token_ids else None}
    print(json.dumps({k: v for k, v in row.items() if k != "config"}, default=str, indent=1))
    with open(out, "w") as f:
        json.dump(row, f, default=str, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["prepare", "run"])
    ap.add_argument("--ckpt", default="/tmp/v2lite")
    ap.add_argument("--config", default="deepseek-v2-lite")
    ap.add_argument("--system", default="moegen")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--device-memory", default="16GiB")
    ap.add_argument("--opt", action="append", default=[], help="KEY=VALUE system option (ints parsed)")
    ap.add_argument("--out", default="offload_check.json")
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.ckpt, args.config)
    else:
        opts = {k: int(v) if v.isdigit() else v for k, v in (o.split("=", 1) for o in args.opt)}
        run(args.ckpt, args.system, args.n, args.prompt_len, args.gen, args.device_memory, args.out, opts)


if __name__ == "__main__":
    main()
