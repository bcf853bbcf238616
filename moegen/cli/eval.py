"""`moegen eval`: lm-eval tasks on a checkpoint, through moegen or lm-eval's `hf` backend.

    moegen eval --model DIR --tasks gsm8k_local,gsm8k_mc_local --limit 20 --dtype float32 --out results.json

Prints a table of the scores and writes run_eval's JSON (scores, configs, per-sample responses).
Wire it in with `moegen.cli.eval.add_subparser(subparsers)`; errors are MoegenError, which
moegen.cli's main() reports as `moegen eval: error: ...`.
"""
import json
import os
from pathlib import Path

from moegen.engine.options import ENGINE_OPTIONS, LOAD_OPTIONS, add_arguments, values_of
from moegen.jsonl import output_target, write_output


def add_subparser(subparsers):
    p = subparsers.add_parser("eval", help="evaluate a checkpoint on lm-eval tasks (offline GSM8K tasks built in)")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. gsm8k_local,gsm8k_mc_local")
    p.add_argument("--limit", type=int, help="only the first N documents of each task")
    p.add_argument("--num-fewshot", type=int, help="fewshot examples per prompt (default: the task's, 5 for GSM8K)")
    p.add_argument("--include-path", help="extra directory of lm-eval task YAML files")
    p.add_argument("--system", default="moegen", help="moegen (default) or hf (lm-eval's transformers backend)")
    add_arguments(p, LOAD_OPTIONS)
    p.add_argument("--gen-kwargs", help="override generation settings, lm-eval style: 'max_gen_toks=64,temperature=0'")
    p.add_argument("--out", help="write the full results (scores, configs, per-sample responses) as JSON here")
    add_arguments(p.add_argument_group("engine options (system moegen)"), ENGINE_OPTIONS)
    p.add_argument("--batch-size", type=int, help="batch size of system hf (default 16)")
    p.set_defaults(func=main_eval)
    return p


def main_eval(args) -> int:
    # Offline by default: nothing is fetched from the Hugging Face hub (set these to 0 to allow it).
    # Set before lm_eval / datasets are imported, which read them once.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from moegen.eval.run import run_eval
    if args.out:
        output_target(args.out)                # a bad output path fails now, not after the run

    options = values_of(args, ENGINE_OPTIONS)
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    result = run_eval(args.model, args.tasks, limit=args.limit, system=args.system, dtype=args.dtype,
                      device=args.device, num_fewshot=args.num_fewshot, include_path=args.include_path,
                      engine_options=options or None, gen_kwargs=args.gen_kwargs)
    print_table(result)
    if args.out:
        write_output(Path(args.out), json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def score_rows(result: dict) -> "list[tuple[str, str, str, float, object, object]]":
    """(task, filter, metric, value, stderr, n) for every score in lm-eval's `results`."""
    rows = []
    for task, scores in result.get("results", {}).items():
        n = result.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in scores.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            rows.append((task, filt, metric, value, scores.get(f"{metric}_stderr,{filt}"), n))
    return rows


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.get('system')} · {result.get('model')} · {result.get('wall_s')} s")
    for col in ("task", "filter", "metric", "value", "stderr", "n"):
        table.add_column(col, justify="right" if col in ("value", "stderr", "n") else "left")
    for task, filt, metric, value, stderr, n in score_rows(result):
        table.add_row(task, filt, metric, _num(value), _num(stderr), "" if n is None else str(n))
    console = Console()
    console.print(table)
    if result.get("engine"):
        e = result["engine"]
        console.print(f"engine: prefill {e['prefill_tokens']} tokens at {e['prefill_tok_s']} tok/s, "
                      f"decode {e['decode_tokens']} tokens at {e['decode_tok_s']} tok/s ({e['attention']})")


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else ("" if x is None else str(x))


