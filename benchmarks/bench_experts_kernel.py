"""One MoE layer's routed experts: the fused kernel (each ISA this CPU runs) against one oneDNN GEMM
chain per expert over packed weights (the per-expert path), bf16, fresh random routing every call
(so every call has new row counts, as in the engine).

    PYTHONPATH=. python benchmarks/bench_experts_kernel.py [--calls 6] [--layers 4] [--formats bfloat16,fp8,int8,int4] [--int8-kernel]

Shapes: the bench fixtures' Mixtral (8 experts of [1024, 3584], top-2) and qwen3_moe (64 of
[1024, 448], top-8), at 512 tokens (decode of G = 512) and 4096 (a prefill pass). `--layers`
distinct copies of the weights are cycled, so that they come from memory as in a real pass.
Quantized formats (fp8 128x128 blocks, GPTQ int8/int4 groups of 128) compare the kernel (its
tiles dequantized inside it) with the per-expert path (chunked dequantization + oneDNN GEMMs);
each line also gives the kernel's rate relative to bf16's at the same shape. `--int8-kernel` adds,
for bf16 weights, experts_kernel=int8's kernel (lossy: csrc/experts_int8.cpp) on each ISA it runs
here (AMX-INT8, AVX-512 VNNI; not the portable one), against the exact kernel's rate.
"""
import argparse
import os
import statistics
import time

import torch

from moegen.layers.linear import pack_weight
from moegen.layers.moe import Dispatch, SparseMoE
from moegen.layers.quantized import quantize_fp8, quantize_int, tile_codes
from moegen.ops import experts as fused

SHAPES = {"mixtral": (1024, 3584, 8, 2), "qwen3_moe": (1024, 448, 64, 8)}
QUANTIZE = {"bfloat16": lambda w: w, "fp8": quantize_fp8, "int8": lambda w: quantize_int(w, 8, 64),
            "int4": lambda w: quantize_int(w, 4, 64)}


def per_expert_path(gate_ups, downs):
    """moe.py's per-expert path over these weights: (the layer, its weights dict)."""
    moe = SparseMoE("layer", downs[0].shape[0], downs[0].shape[1], len(downs), router=None)
    weights = {}
    for e, (gu, dn) in enumerate(zip(gate_ups, downs)):
        weights[f"{moe.expert_key(e)}.gate_up"], weights[f"{moe.expert_key(e)}.down"] = gu, dn
    return moe, weights


def time_calls(run, tokens, hidden, experts, k, calls, layers, g):
    """Median seconds of run(layer, x, dispatch) over fresh inputs and routing, cycling the layers."""
    times = []
    for call in range(calls + 1):
        x = torch.randn(tokens, hidden, generator=g).bfloat16()
        top_w, top_i = torch.rand(tokens, experts, generator=g).topk(k, dim=1)
        d = Dispatch.from_routing(top_i, top_w, experts)
        t0 = time.perf_counter()
        run(call % layers, x, d)
        if call:                        # the first call warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--formats", default="bfloat16")
    ap.add_argument("--int8-kernel", action="store_true", help="also time the lossy int8 kernel (bf16 weights)")
    args = ap.parse_args()
    if fused.native_ops() is None:
        raise SystemExit("moegen's native kernels did not build here: nothing to benchmark (see `moegen build-ops`)")
    g = torch.Generator().manual_seed(0)
    bf16_rate = {}
    for name, (hidden, inter, experts, k) in SHAPES.items():
        for fmt in args.formats.split(","):
            plain = [([QUANTIZE[fmt]((torch.randn(2 * inter, hidden, generator=g) * 0.05).bfloat16())
                       for _ in range(experts)],
                      [QUANTIZE[fmt]((torch.randn(hidden, inter, generator=g) * 0.05).bfloat16())
                       for _ in range(experts)]) for _ in range(args.layers)]
            prep = (lambda w: pack_weight(w)) if fmt == "bfloat16" else (lambda w: w)
            tiles = (lambda w: w) if fmt == "bfloat16" else tile_codes
            oned = [per_expert_path([prep(w) for w in gu], [prep(w) for w in dn]) for gu, dn in plain]
            packed = [fused.pack_layer([tiles(w) for w in gu], [tiles(w) for w in dn], inter) for gu, dn in plain]
            int8_isas = [i for i in fused.available_int8_isas() if i != "generic"] \
                if args.int8_kernel and fmt == "bfloat16" else []
            int8 = [fused.pack_layer_int8(lambda e: (gu[e], dn[e]), experts, hidden, inter) for gu, dn in plain] \
                if int8_isas else []
            del plain
            isas = fused.available_isas() if fmt == "bfloat16" else fused.available_isas()[:1]
            for tokens in (512, 4096):
                flops = 6.0 * tokens * k * hidden * inter
                rates = {}
                for system in ["per-expert"] + isas + [f"int8 {i}" for i in int8_isas]:
                    if system == "per-expert":
                        run = lambda layer, x, d: oned[layer][0].run_experts(oned[layer][1], x, d)
                    elif system.startswith("int8 "):
                        os.environ["MOEGEN_EXPERTS_INT8_ISA"] = system.split()[1]
                        run = lambda layer, x, d: fused.moe_experts_int8(x, d.token_idx, d.weights, d.counts,
                                                                         *int8[layer], inter, k)
                    else:
                        os.environ["MOEGEN_EXPERTS_ISA"] = system
                        run = lambda layer, x, d: fused.moe_experts(x, d.token_idx, d.weights, d.counts,
                                                                    *packed[layer], inter, k)
                    rates[system] = flops / time_calls(run, tokens, hidden, experts, k, args.calls, args.layers, g)
                base = rates["per-expert"]
                kernel = rates[isas[0]]
                bf16_rate.setdefault((name, tokens), kernel)
                print(f"{name} {fmt} {tokens} tokens ({tokens * k // experts} rows/expert): " + ", ".join(
                    f"{s} {r / 1e12:.2f} TFLOP/s ({r / base:.1f}x)" for s, r in rates.items())
                    + f"; kernel vs bf16 kernel {kernel / bf16_rate[name, tokens]:.2f}x", flush=True)
            os.environ.pop("MOEGEN_EXPERTS_ISA", None)
            os.environ.pop("MOEGEN_EXPERTS_INT8_ISA", None)


if __name__ == "__main__":
    main()
