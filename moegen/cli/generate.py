"""`moegen generate`: completions for a JSONL file of prompts."""
import json
import sys
import time
from pathlib import Path

from moegen.dtypes import dtype_name
from moegen.engine.options import ENGINE_OPTIONS, LOAD_OPTIONS, add_arguments, values_of
from moegen.harness.metrics import e2e_tokens_per_s
from moegen.harness.prompts import read_prompts
from moegen.jsonl import STDOUT, jsonl_text, output_target, write_output


def engine_kwargs(args) -> dict:
    """Engine.from_pretrained / from_config keyword arguments from the flags of add_engine_args."""
    return values_of(args, LOAD_OPTIONS + ENGINE_OPTIONS)


def cmd_generate(args):
    from moegen.engine import Engine, SamplingParams
    output_target(args.out)                    # a bad output path fails now, not after the run
    prompts = read_prompts(Path(args.input), args.prompt_field, args.template, args.limit)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos, stop=args.stop or [])
    t0 = time.perf_counter()
    if args.dummy_weights:
        engine = Engine.from_config(args.model, dummy_weights=True, **engine_kwargs(args))
    else:
        engine = Engine.from_pretrained(args.model, **engine_kwargs(args))
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    outs = engine.generate(prompts, params, progress=not args.quiet, truncate=args.truncate)
    wall = time.perf_counter() - t1
    write_output(Path(args.out), jsonl_text(c.to_row() for c in outs))
    s, gen = engine.stats, sum(len(c.token_ids) for c in outs)
    summary = {"sequences": len(outs), "prompt_tokens": s.prefill_tokens, "generated_tokens": gen,
               "load_s": round(load_s, 2), "wall_s": round(wall, 2), "end_to_end_tok_s": round(e2e_tokens_per_s(gen, wall), 1),
               "prefill_tok_s": round(s.prefill_tok_s, 1), "decode_tok_s": round(s.decode_tok_s, 1),
               "parameters": engine.model.num_parameters(), "dtype": dtype_name(engine.model.dtype),
               "attention": s.attention, "experts_skipped": s.experts_skipped, "out": args.out}
    # with --out - the rows own stdout; the summary goes to stderr
    print(json.dumps(summary, indent=1), file=sys.stderr if args.out == STDOUT else sys.stdout)


def add_engine_args(p):
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors); with "
                   "--dummy-weights also a config.json or a bundled config name (e.g. deepseek-v2-lite)")
    p.add_argument("--dummy-weights", action="store_true", help="random weights of the config's shapes, made in memory")
    add_arguments(p, LOAD_OPTIONS + ENGINE_OPTIONS)


def add_subparser(sub):
    p = sub.add_parser("generate", help="generate completions for a JSONL file of prompts")
    add_engine_args(p)
    p.add_argument("--input", required=True, help="JSONL rows with 'prompt' or 'prompt_token_ids'")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--prompt-field", help="take the prompt text from this field of each row")
    p.add_argument("--template", help="python format string over row fields, e.g. 'Question: {question}\\nAnswer:'")
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--truncate", choices=["left"], help="prompts too long for the context keep their last tokens "
                   "(default: such a prompt is an error naming its row)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)
