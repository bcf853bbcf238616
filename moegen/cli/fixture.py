"""`moegen fixture`: write a random-weight HF checkpoint, or SmolLM2 upcycled, for tests and benchmarks."""
import time

from moegen.checkpoints.fixture import ARCHS, PRESETS, QUANTIZE, TRAINED_PRESETS
from moegen.checkpoints.upcycle import DEFAULT_PERTURB


def cmd_fixture(args):
    from moegen.checkpoints.fixture import build_fixture
    t0 = time.perf_counter()
    out = build_fixture(args.arch, args.preset, args.seed, args.out, dtype=args.dtype,
                        fused_experts=args.fused_experts, perturb=args.perturb, quantize=args.quantize)
    quantized = f" {args.quantize}" if args.quantize else ""
    print(f"fixture {args.arch}/{args.preset}{quantized} seed={args.seed} -> {out} ({time.perf_counter() - t0:.1f}s)")


def add_subparser(sub):
    p = sub.add_parser("fixture", help="write a random-weight HF checkpoint (or SmolLM2 upcycled) for tests and benchmarks")
    p.add_argument("--arch", required=True, choices=list(ARCHS))
    p.add_argument("--preset", required=True, choices=[*PRESETS, *TRAINED_PRESETS],
                   help="tiny/small/bench: random weights; smollm2: trained SmolLM2-135M upcycled into --arch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", help="weight dtype on disk (default float32; bfloat16 for bench)")
    p.add_argument("--fused-experts", action="store_true", help="write transformers-5 fused expert tensors")
    p.add_argument("--perturb", type=float, help="smollm2: std of each expert's noise relative to its weights' "
                   f"(default {DEFAULT_PERTURB}; 0 gives identical experts, i.e. the dense model)")
    p.add_argument("--quantize", choices=list(QUANTIZE), help="fp8: GEMM weights in FP8 with one float32 scale per "
                   "128x128 block, as DeepSeek-V3 ships them (int8/int4: `moegen quantize`)")
    p.set_defaults(func=cmd_fixture)
