"""A/B builds of the fused experts kernel in one process: each variant is the native library built
from a csrc/ tree (this checkout's, or another's: a `git worktree` or `git archive REV csrc | tar -x`)
with extra compiler flags, loaded into its own op namespace; every call runs all variants on the
same fresh inputs and routing, in turn (the order rotated from call to call, each variant on its
own copy of the weights), and their outputs must be identical. On a VM whose speed
moves ±15% from run to run, only such interleaved ratios tell a kernel change from noise.

    PYTHONPATH=. python benchmarks/ab_experts_kernel.py 'base@/tmp/old=' 'new=' ['flag=-DFOO=1'] \\
        [--shape mixtral|qwen3_moe] [--tokens 512,4096] [--calls 12] [--threads N] [--format fp8|int8|int4] [--isa amx|avx512-bf16|generic]
        [--kernel int8 [--isa amx-int8|avx512-vnni|generic]]

A variant is NAME[@DIR]=FLAGS: DIR holds the csrc/ to build (default: this checkout's), FLAGS are
extra compiler flags (e.g. a -D for an experiment's #if). Medians of `--calls` calls after one
warm-up; the ISA this CPU runs fastest (`--isa` picks another); bf16 weights, or quantized ones (`--format`: moegen's own fp8 blocks / GPTQ int
groups of random weights, as `moegen quantize` stores them). `--kernel int8`: experts_kernel=int8's
lossy kernel (csrc/experts_int8.cpp) over the bf16 weights re-quantized by `pack_layer_int8`, rates in
its int8 operations a second. Shapes as in bench_experts_kernel.py.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from moegen.layers import quantized
from moegen.layers.moe import Dispatch
from moegen.ops import experts as fused
from moegen.ops.build import SOURCES, load_native
from moegen.ops.experts import FORMAT_CODES, INT8_ISA_CODES, ISA_CODES

SHAPES = {"mixtral": (1024, 3584, 8, 2), "qwen3_moe": (1024, 448, 64, 8)}


def load_variant(i: int, spec: str):
    name, _, flags = spec.partition("=")
    sources = SOURCES
    if "@" in name:
        name, tree = name.split("@", 1)
        if not (Path(tree) / "csrc").is_dir():
            raise SystemExit(f"variant {spec!r}: no csrc/ under {tree}")
        # an older tree may lack later sources (the experts ops need only the ones it has)
        sources = tuple(p for p in (Path(tree) / "csrc" / s.name for s in SOURCES) if p.is_file())
    ops = load_native(source=sources, extra_cflags=tuple(flags.split()), namespace=f"moegen_ab{i}")
    if ops is None:
        raise SystemExit(f"variant {spec!r} did not build (see the warning above)")
    return name, ops


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="NAME[@DIR]=FLAGS")
    ap.add_argument("--shape", choices=SHAPES, default="mixtral")
    ap.add_argument("--tokens", default="512,4096")
    ap.add_argument("--calls", type=int, default=12)
    ap.add_argument("--layers", type=int, default=4, help="distinct weight copies cycled (weights come from memory)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--allow-differ", action="store_true", help="experiments that change the output")
    ap.add_argument("--format", choices=["bfloat16", "fp8", "int8", "int4"], default="bfloat16")
    ap.add_argument("--kernel", choices=["exact", "int8"], default="exact")
    ap.add_argument("--isa", choices=list(ISA_CODES) + list(INT8_ISA_CODES), help="default: the fastest this CPU runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    int8 = args.kernel == "int8"
    if int8 and args.format != "bfloat16":
        raise SystemExit("--kernel int8 re-quantizes bf16 weights: --format must be bfloat16")
    codes = INT8_ISA_CODES if int8 else ISA_CODES
    if args.isa is not None and args.isa not in codes:
        raise SystemExit(f"--isa {args.isa} is not one of the {args.kernel} kernel's: {', '.join(codes)}")
    variants = dict(load_variant(i, v) for i, v in enumerate(args.variants))
    isa = codes[args.isa or (fused.int8_isa() if int8 else fused.available_isas()[0])]
    hidden, inter, experts, k = SHAPES[args.shape]
    g = torch.Generator().manual_seed(0)

    def weight(n, k):
        w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
        if args.format == "bfloat16":
            return w
        q = quantized.quantize_fp8(w) if args.format == "fp8" else quantized.quantize_int(
            w, int(args.format[3:]), group_size=quantized.GPTQ_GROUP if k % quantized.GPTQ_GROUP == 0 else 64)
        return quantized.tile_codes(q)

    # each variant its own packed copy of every layer (same values): at decode sizes the weights come
    # from memory, and a variant that ran after another on the same copy could find them in the L3
    layers = []
    for _ in range(args.layers):
        raw = [weight(2 * inter, hidden) for _ in range(experts)], [weight(hidden, inter) for _ in range(experts)]
        pack = (lambda gu, dn: fused.pack_layer_int8(lambda e: (gu[e], dn[e]), experts, hidden, inter)) if int8 \
            else (lambda gu, dn: fused.pack_layer(gu, dn, inter))
        layers.append({name: pack(*raw) for name in variants})
    for tokens in map(int, args.tokens.split(",")):
        times = {name: [] for name in variants}
        for call in range(args.calls + 1):
            x = torch.randn(tokens, hidden, generator=g).bfloat16()
            top_w, top_i = torch.rand(tokens, experts, generator=g).topk(k, dim=1)
            d = Dispatch.from_routing(top_i, top_w, experts)
            outs = []
            names = list(variants)                      # the order rotated from call to call
            for name in names[call % len(names):] + names[:call % len(names)]:
                ops, (gate_up, down) = variants[name], layers[call % args.layers][name]
                t0 = time.perf_counter()
                w = d.weights.float().contiguous()
                outs.append(ops.ops.moe_experts_int8(x, d.token_idx, w, d.counts, gate_up, down, inter, k, isa) if int8
                            else ops.ops.moe_experts(x, d.token_idx, w, d.counts, gate_up, down, inter, k, isa,
                                                     FORMAT_CODES[args.format]))
                if call:                                # the first call warms up
                    times[name].append(time.perf_counter() - t0)
            assert args.allow_differ or all(torch.equal(o, outs[0]) for o in outs), "variants disagree"
        flops = 6.0 * tokens * k * hidden * inter
        rates = {name: flops / statistics.median(t) for name, t in times.items()}
        base = next(iter(rates.values()))
        print(f"{args.shape} {tokens} tokens ({tokens * k // experts} rows/expert): " + ", ".join(
            f"{name} {r / 1e12:.2f} {'TOP/s' if int8 else 'TFLOP/s'} ({r / base:.3f}x)" for name, r in rates.items()),
            flush=True)


if __name__ == "__main__":
    main()
