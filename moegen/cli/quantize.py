"""`moegen quantize`: a checkpoint's GEMM weights rewritten as GPTQ int8/int4 groups or FP8 blocks."""
import time


def cmd_quantize(args):
    from moegen.checkpoints.quantize import quantize_checkpoint
    fmt = "fp8" if args.fp8 else f"int{args.bits}"
    t0 = time.perf_counter()
    out, kept = quantize_checkpoint(args.input, args.output, fmt, group_size=args.group_size, sym=not args.asym,
                                    skip=args.skip or ())
    note = f"; {len(kept)} weight(s) kept unquantized (shape not a whole number of groups)" if kept else ""
    print(f"quantized {args.input} -> {out} ({fmt}{'' if args.fp8 else f', groups of {args.group_size}'}) in "
          f"{time.perf_counter() - t0:.1f}s{note}")


def add_subparser(sub):
    p = sub.add_parser("quantize", help="rewrite a checkpoint's GEMM weights quantized (GPTQ int8/int4, or FP8 blocks)")
    p.add_argument("input", help="checkpoint directory (unquantized safetensors, one tensor per expert)")
    p.add_argument("output", help="directory for the quantized checkpoint")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--bits", type=int, choices=[8, 4], help="GPTQ integer weights, round-to-nearest")
    kind.add_argument("--fp8", action="store_true", help="float8_e4m3fn with a float32 scale per 128x128 block "
                      "(DeepSeek-V3's format)")
    p.add_argument("--group-size", type=int, default=128, help="GPTQ: input features per scale (default 128)")
    p.add_argument("--asym", action="store_true", help="GPTQ: asymmetric groups (a zero point per group; default symmetric)")
    p.add_argument("--skip", action="append", metavar="MODULE",
                   help="leave this module unquantized (e.g. model.layers.0.self_attn.q_proj); repeatable")
    p.set_defaults(func=cmd_quantize)
