"""`moegen bench`: compare systems on one workload; prints a table, writes the JSON of moegen.bench.run.

    moegen bench --model DIR --systems moegen,hf-generate --workload synthetic:prompt=128,gen=64,n=256 \
        [--repeat K] [--dtype bfloat16] [--device cpu] [--usd-per-hour X] [--json OUT.json] \
        [--opt hf-generate.batch_size=64 ...] [--probe quick|full|fresh|off] [--outputs]
"""
from __future__ import annotations

import json
import sys

from moegen.engine.options import LOAD_OPTIONS, add_arguments, engine_option_names
from moegen.errors import InputError
from moegen.jsonl import output_target
from moegen.results.metrics import formatted, label

DEFAULT_SYSTEMS = "moegen,hf-generate"


def parse_opt(text: str) -> tuple[str, str, object]:
    """'SYSTEM.KEY=VALUE' -> (system, key, value); VALUE is read as JSON when it parses
    (64, 0.5, true, [16,64], "x"), else kept as text (e.g. 20GB)."""
    target, eq, raw = text.partition("=")
    system, dot, key = target.rpartition(".")
    if not eq or not dot or not system or not key:
        raise InputError(f"--opt {text!r}: expected SYSTEM.KEY=VALUE, e.g. hf-generate.batch_size=64")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return system, key, value


def options_of(opts: list[str] | None) -> dict:
    out: dict = {}
    for text in opts or []:
        system, key, value = parse_opt(text)
        out.setdefault(system, {})[key] = value
    return out


def _fmt(value, spec: str = ",.1f", scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value * scale:{spec}}{suffix}"


def render(report: dict) -> str:
    """The report as a rich table plus its agreement, baseline and skip lines (plain text)."""
    import io

    from rich.console import Console
    from rich.table import Table

    cfg, wl = report["config"], report["config"]["workload"]
    title = (f"moegen bench: {cfg['model']} | {wl['name']}: {wl['num_prompts']} prompts, "
             f"{wl['prompt_tokens']} prompt tokens, {wl['max_new_tokens']} new each | "
             f"{cfg['dtype']} on {cfg['device']}")
    table = Table(title=title, title_justify="left")
    figures = ("prefill_tokens_per_s", "decode_tokens_per_s", "e2e_tokens_per_s", "x baseline", "wall_s",
               "peak_rss_bytes", "prefill_s_mfu", "decode_s_mbu", "usd_per_million_tokens", "accuracy")
    columns = ("system", *(f if f == "x baseline" else label(f) for f in figures))
    for name in columns:
        table.add_column(name, justify="left" if name == "system" else "right")
    for row in report["systems"]:
        m, r = row["metrics"], row["ratios"] or {}
        if row["status"] != "ok":
            table.add_row(row["system"], row["status"], *["-"] * (len(columns) - 2))
            continue
        is_base = row["system"] == report["baseline"]
        ratio = "baseline" if is_base else _fmt(r.get("e2e_tokens_per_s"), ".2f", suffix="x")
        table.add_row(row["system"], *(ratio if f == "x baseline" else formatted(f, m[f]) for f in figures))
    out = io.StringIO()
    console = Console(file=out, width=160, color_system=None)
    console.print(table)
    peaks = report["hardware"]["peaks"]
    console.print(f"peaks: {_fmt(peaks['flops_per_s'], '.3g')} FLOP/s, {_fmt(peaks['bw_gbps'], '.1f')} GB/s "
                  f"({peaks['source']})", highlight=False)
    console.print(agreement_line(report), highlight=False)
    for row in report["systems"]:
        line = prediction_line(row)
        if line:
            console.print(line, highlight=False)
    for row in report["systems"]:
        if row["status"] != "ok":
            console.print(f"{row['system']} {row['status']}: {row['reason']}", highlight=False)
    return out.getvalue()


def prediction_line(row: dict) -> str:
    """The planner's prediction beside the measurement, for systems that planned (moegen)."""
    m = row["metrics"]
    predicted = m.get("predicted_e2e_tokens_per_s") if row["status"] == "ok" else None
    if not predicted or not m.get("e2e_tokens_per_s"):
        return ""
    return (f"{row['system']}: planner predicted {predicted:,.0f} e2e tok/s (prefill "
            f"{_fmt(m.get('predicted_prefill_tokens_per_s'), ',.0f')}, decode {_fmt(m.get('predicted_decode_tokens_per_s'), ',.0f')}, "
            f"{m.get('predicted_bound')}-bound), measured {m['e2e_tokens_per_s']:,.0f}: "
            f"{predicted / m['e2e_tokens_per_s'] - 1:+.0%}")


def agreement_line(report: dict) -> str:
    a = report["agreement"]
    if a["reference"] is None:
        return "greedy agreement: no system ran"
    parts = []
    for name, c in a["systems"].items():
        text = f"{name} {c['sequences_equal']}/{c['sequences']} sequences ({c['token_agreement']:.1%} of tokens)"
        d = c["first_divergence"]
        if d:
            text += (f", first divergence prompt {d['prompt']} token {d['position']} "
                     f"({d['reference_token']} vs {d['token']})")
        parts.append(text)
    verdict = ""
    if a["exact_required"]:
        verdict = " | float32: exact match required: " + ("OK" if a["ok"] else "MISMATCH")
    return f"greedy agreement vs {a['reference']}: " + ("; ".join(parts) or "nothing to compare") + verdict


def cmd_bench(args) -> None:
    from moegen.bench.run import run_bench, write_json
    if args.json:
        output_target(args.json)               # a bad output path fails now, not after the run
    report = run_bench(args.model, args.systems, args.workload, repeat=args.repeat, dtype=args.dtype,
                       device=args.device, dummy_weights=args.dummy_weights, usd_per_hour=args.usd_per_hour,
                       options=options_of(args.opt), probe=args.probe, outputs=args.outputs,
                       progress=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    print(render(report), end="")
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")


def add_subparser(subparsers):
    """Add `bench` to the `moegen` command's subparsers."""
    p = subparsers.add_parser("bench", help="compare moegen with other systems on one workload")
    p.add_argument("--model", required=True,
                   help="checkpoint directory, or with --dummy-weights a bundled config name (e.g. mixtral-8x7b)")
    p.add_argument("--dummy-weights", action="store_true",
                   help="random weights of the model's config (moegen systems only; the others are skipped)")
    p.add_argument("--systems", default=DEFAULT_SYSTEMS,
                   help=f"comma-separated systems, the first the agreement reference (default {DEFAULT_SYSTEMS}); "
                        "known: moegen, moegen-model-batching, moegen-int8, hf-generate, hf-continuous, hf-offload, vllm, llama.cpp, "
                        "llama.cpp-q8_0 (the peers: `moegen peers install`)")
    p.add_argument("--workload", required=True,
                   help="synthetic:prompt=128,gen=64,n=512 | gsm8k[:PATH][,n=..,gen=..] | hf:NAME_OR_FILE,field=..")
    p.add_argument("--repeat", type=int, default=1, help="timed passes per system; the median is reported")
    add_arguments(p, LOAD_OPTIONS)
    p.add_argument("--usd-per-hour", type=float, help="machine price, for the cost per million tokens")
    p.add_argument("--opt", action="append", metavar="SYSTEM.KEY=VALUE",
                   help="a system option, e.g. hf-generate.batch_size=64 or moegen.max_batch=512 (repeatable); "
                        f"moegen's: {', '.join(engine_option_names())}")
    p.add_argument("--probe", choices=["quick", "full", "fresh", "off"], default="quick",
                   help="hardware peaks for S-MFU/S-MBU: measured (quick/full: cached per machine; fresh: re-measured in this run) or datasheet only")
    p.add_argument("--outputs", action="store_true", help="also write every system's token ids and texts")
    p.add_argument("--json", help="write the full result here")
    p.set_defaults(func=cmd_bench)
    return p
