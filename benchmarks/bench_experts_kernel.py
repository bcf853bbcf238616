"""One MoE layer's routed experts: the fused kernel (each ISA this CPU runs) against one oneDNN GEMM
chain per expert over packed weights (the per-expert path), bf16, fresh random routing every call
(so every call has new row counts, as in the engine).

    PYTHONPATH=. python benchmarks/bench_experts_kernel.py [--calls 6] [--layers 4]

Shapes: the bench fixtures' Mixtral (8 experts of [1024, 3584], top-2) and qwen3_moe (64 of
[1024, 448], top-8), at 512 tokens (decode of G = 512) and 4096 (a prefill pass). `--layers`
distinct copies of the weights are cycled, so that they come from memory as in a real pass.
"""
import argparse
import os
import statistics
import time

import torch

from moegen.layers.linear import pack_weight
from moegen.layers.moe import Dispatch, SparseMoE
from moegen.ops import experts as fused

SHAPES = {"mixtral": (1024, 3584, 8, 2), "qwen3_moe": (1024, 448, 64, 8)}


def per_expert_path(gate_ups, downs):
    """moe.py's per-expert path over these weights: (the layer, its weights dict)."""
    moe = SparseMoE("layer", downs[0].shape[0], downs[0].shape[1], len(downs), router=None)
    weights = {}
    for e, (gu, dn) in enumerate(zip(gate_ups, downs)):
        weights[f"{moe.expert_key(e)}.gate_up"], weights[f"{moe.expert_key(e)}.down"] = gu, dn
    return moe, weights


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    for name, (hidden, inter, experts, k) in SHAPES.items():
        plain = [([(torch.randn(2 * inter, hidden, generator=g) * 0.05).bfloat16() for _ in range(experts)],
                  [(torch.randn(hidden, inter, generator=g) * 0.05).bfloat16() for _ in range(experts)])
                 for _ in range(args.layers)]
        oned = [per_expert_path([pack_weight(w) for w in gu], [pack_weight(w) for w in dn]) for gu, dn in plain]
        packed = [fused.pack_layer(gu, dn, inter) for gu, dn in plain]
        for tokens in (512, 4096):
            flops = 6.0 * tokens * k * hidden * inter
            rates = {}
            for system in ["per-expert oneDNN"] + fused.available_isas():
                times = []
                for call in range(args.calls + 1):
                    x = torch.randn(tokens, hidden, generator=g).bfloat16()
                    top_w, top_i = torch.rand(tokens, experts, generator=g).topk(k, dim=1)
                    d = Dispatch.from_routing(top_i, top_w, experts)
                    layer = call % args.layers
                    t0 = time.perf_counter()
                    if system == "per-expert oneDNN":
                        moe, weights = oned[layer]
                        moe.run_experts(weights, x, d)
                    else:
                        os.environ["MOEGEN_EXPERTS_ISA"] = system
                        fused.moe_experts(x, d.token_idx, d.weights, d.counts, *packed[layer], inter, k)
                    if call:                        # the first call warms up
                        times.append(time.perf_counter() - t0)
                rates[system] = flops / statistics.median(times)
            base = rates["per-expert oneDNN"]
            print(f"{name} {tokens} tokens ({tokens * k // experts} rows/expert): " + ", ".join(
                f"{s} {r / 1e12:.2f} TFLOP/s ({r / base:.1f}x)" for s, r in rates.items()), flush=True)
        os.environ.pop("MOEGEN_EXPERTS_ISA", None)


if __name__ == "__main__":
    main()
