"""`moegen build-ops` (compile the native kernels) and `moegen probe` (measure this machine, and a
checkpoint's disk with --disk)."""
import json
from pathlib import Path


def cmd_build_ops(args):
    from moegen.ops.build import build_ops
    print(build_ops(verbose=args.verbose))


def cmd_probe(args):
    from moegen.planner.probe import format_probe, probe
    result = probe(device=args.device, refresh=args.refresh)
    if args.disk:
        from moegen.planner.disk_probe import disk_read
        result = {**result, "disk_read": disk_read(args.disk, refresh=args.refresh)}
    print(format_probe(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def add_subparser(sub):
    p = sub.add_parser("build-ops", help="compile the native C++ ops ahead of time")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_build_ops)

    p = sub.add_parser("probe", help="measure this machine's GEMM, memory and attention rates")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--refresh", action="store_true", help="re-measure instead of using the cache")
    p.add_argument("--disk", metavar="CHECKPOINT_DIR", help="also measure the read bandwidth of the disk this "
                   "checkpoint is on (what weights stream at when --host-memory is below the model's size)")
    p.set_defaults(func=cmd_probe)
