"""`moegen generate`: completions for a JSONL file of prompts."""
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from moegen.dtypes import dtype_name
from moegen.engine.options import ENGINE_OPTIONS, LOAD_OPTIONS, add_arguments, values_of
from moegen.generation.journal import (FLUSH_ROWS, FLUSH_SECONDS, ORDERS, fingerprint, open_output, pending_indices,
                                    sampling_fingerprint, write_completions)
from moegen.bench.metrics import e2e_tokens_per_s
from moegen.errors import InputError
from moegen.generation.prompts import read_chat_prompts, read_prompts
from moegen.generation.replicas import EngineRecipe, Replicas, open_source
from moegen.jsonl import STDOUT, output_target


def engine_kwargs(args) -> dict:
    """Engine.from_pretrained / from_config keyword arguments from the flags of add_engine_args."""
    return values_of(args, LOAD_OPTIONS + ENGINE_OPTIONS)


def cmd_generate(args):
    check_paths(args)
    if args.format == "openai-batch":
        return cmd_openai_batch(args)
    prompts = read_input(args)
    # unset --temperature/--top-p/--top-k: the checkpoint's generation_config.json, else greedy
    params = generation_defaults(args).params(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, ignore_eos=args.ignore_eos, stop=args.stop or [], logprobs=args.logprobs,
        prompt_logprobs=args.prompt_logprobs, n=args.n)
    journal = open_output(args.out, cli_fingerprint(args, prompts, params), args.flush_rows, args.flush_seconds,
                          args.overwrite, args.wait)
    try:
        summary = generate_into(journal, prompts, params, args)
    finally:
        journal.release()                      # a run that failed (even before its first row) lets go
    # with --out - the rows own stdout; the summary goes to stderr
    print(json.dumps(summary, indent=1), file=sys.stderr if args.out == STDOUT else sys.stdout)


def check_paths(args) -> None:
    """Before any work: --out must be writable and must not be --input (or a link to it), which
    the output would overwrite; flags that --format openai-batch would silently ignore are refused."""
    output_target(args.out)                    # a bad output path fails now, not after the run
    if same_file(args.input, args.out):
        raise InputError(f"--out {args.out} is the input file {args.input}: the output would overwrite the "
                         "prompts; choose another output")
    if args.format == "openai-batch":
        ignored = [flag for flag, value in (("--chat", args.chat), ("--template", args.template),
                                            ("--prompt-field", args.prompt_field)) if value]
        if ignored:
            raise InputError(f"{', '.join(ignored)} cannot be used with --format openai-batch: each request's url "
                             "says how it is read (/v1/chat/completions: its messages through the chat template; "
                             "/v1/completions: its prompt)")


def same_file(a, b) -> bool:
    """Whether two paths name one file (the same path, a symlink or a hard link to it)."""
    if STDOUT in (str(a), str(b)):
        return False
    try:
        return Path(a).exists() and Path(b).exists() and Path(a).samefile(b)
    except OSError:
        return False


def read_input(args) -> list:
    """The prompts of --input: texts or token ids, or with --chat token ids of each row's messages
    through the checkpoint's chat template (read with its tokenizer, before the model loads)."""
    if not args.chat:
        return read_prompts(Path(args.input), args.prompt_field, args.template, args.limit)
    if args.template or args.dummy_weights:
        raise InputError("--chat takes each row's messages through the checkpoint's chat template: "
                         "it needs a checkpoint (not --dummy-weights) and no --template")
    from moegen.tokenizer import load_tokenizer
    return read_chat_prompts(Path(args.input), args.prompt_field, args.limit, load_tokenizer(args.model))


def generation_defaults(args):
    from moegen.engine.params import GenerationDefaults
    return GenerationDefaults() if args.dummy_weights else GenerationDefaults.read(args.model)


def cmd_openai_batch(args) -> None:
    """--format openai-batch: every row of an OpenAI batch file answered, in one engine call."""
    from moegen.engine import Engine
    from moegen.generation import openai_batch
    from moegen.jsonl import jsonl_text, write_output
    if args.logprobs is not None or args.prompt_logprobs is not None:
        raise InputError("--logprobs / --prompt-logprobs are for --format prompts; an OpenAI batch row asks in its "
                         "body (chat: logprobs: true, top_logprobs: K; completions: logprobs: K)")
    if Path(args.out).is_file() and Path(args.out).stat().st_size > 0 and not args.overwrite:
        raise InputError(f"{args.out} exists; replace it with --overwrite, or choose another output (a batch file is "
                         "answered in one go: there is no journal to resume)")
    lines = openai_batch.read_batch(Path(args.input), args.limit)
    t0 = time.perf_counter()
    if args.dummy_weights:
        engine = Engine.from_config(args.model, dummy_weights=True, **engine_kwargs(args))
    else:
        engine = Engine.from_pretrained(args.model, **engine_kwargs(args))
    t1 = time.perf_counter()
    rows = openai_batch.run_batch(engine, lines, Path(args.model).name, args.max_new_tokens, args.truncate,
                                  progress=not args.quiet)
    write_output(Path(args.out), jsonl_text(rows))
    summary = {**openai_batch.summary(rows), "load_s": round(t1 - t0, 2),
               "wall_s": round(time.perf_counter() - t1, 2), "out": args.out}
    print(json.dumps(summary, indent=1), file=sys.stderr if args.out == STDOUT else sys.stdout)


def generate_into(journal, prompts: list, params, args) -> dict:
    """The rows the journal lacks, from one engine or --replicas; returns the run's summary."""
    pending = pending_indices(len(prompts), journal)
    t0 = time.perf_counter()
    with open_source(EngineRecipe(args.model, args.dummy_weights, engine_kwargs(args)), len(pending), args.replicas,
                     args.ray_address, args.replica_threads) as source:
        load_s = time.perf_counter() - t0
        completions = source.generate_iter([prompts[i] for i in pending], params, truncate=args.truncate,
                                           indices=pending) if pending else ()
        with tqdm(total=len(prompts), initial=journal.resumed, desc="generate", unit="row", disable=args.quiet,
                  dynamic_ncols=True) as bar:
            tally = write_completions(journal, completions, on_row=lambda t: show_progress(bar, t))
        journal.finish(args.order)
        return {"sequences": len(prompts), "resumed": journal.resumed, "generated_rows": tally.rows,
                "prompt_tokens": tally.prompt_tokens, "generated_tokens": tally.generated_tokens,
                "load_s": round(load_s, 2), "wall_s": round(tally.wall_s, 2),
                "end_to_end_tok_s": round(e2e_tokens_per_s(tally.generated_tokens, tally.wall_s), 1),
                **engine_summary(source), "out": args.out}


def cli_fingerprint(args, prompts: list, params) -> dict:
    """What decides the rows (moegen.generation.journal.fingerprint): a journal of others is refused."""
    engine = {"dtype": args.dtype, "max_model_len": args.max_model_len, "truncate": args.truncate,
              "dummy_weights": args.dummy_weights}
    return fingerprint(args.model, prompts, sampling_fingerprint(asdict(params)), engine)


def show_progress(bar, tally) -> None:
    """Rows done/total and ETA (tqdm's), with this run's generated tokens/s."""
    bar.set_postfix_str(f"{tally.tokens_per_s:.1f} tok/s", refresh=False)
    bar.update(1)


def engine_summary(source) -> dict:
    """The engine's own figures (one engine here), or the replica count (none when nothing ran)."""
    if source is None or isinstance(source, Replicas):
        return {} if source is None else {"replicas": len(source.pids)}
    s = source.stats
    return {"prefill_tok_s": round(s.prefill_tok_s, 1), "decode_tok_s": round(s.decode_tok_s, 1),
            "parameters": source.model.num_parameters(), "dtype": dtype_name(source.model.dtype),
            "attention": s.attention, "experts_skipped": s.experts_skipped}


def add_journal_args(p):
    p.add_argument("--overwrite", action="store_true", help="start over when --out holds the journal of another "
                   "generation, or replace a file that is no journal (default: refuse; the same generation resumes)")
    p.add_argument("--wait", action="store_true", help="when another process is writing --out, wait for it to "
                   "finish (default: refuse at once, naming its PID)")
    p.add_argument("--order", choices=ORDERS, default="input", help="output rows in input order (rewritten at the "
                   "end) or in the order they finished")
    p.add_argument("--flush-rows", type=int, default=FLUSH_ROWS, help="make the journal durable every N rows")
    p.add_argument("--flush-seconds", type=float, default=FLUSH_SECONDS, help="... or every T seconds")
    p.add_argument("--replicas", type=int, default=1, help="engines on Ray (extra `cluster`) sharing the prompts: "
                   "one GPU each on --device cuda, else --replica-threads CPU threads each")
    p.add_argument("--replica-threads", type=int, help="CPU threads per replica (default: the CPUs split evenly)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start Ray here when --replicas > 1)")


def add_engine_args(p):
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors); with "
                   "--dummy-weights also a config.json or a bundled config name (e.g. deepseek-v2-lite)")
    p.add_argument("--dummy-weights", action="store_true", help="random weights of the config's shapes, made in memory")
    add_arguments(p, LOAD_OPTIONS + ENGINE_OPTIONS)


def add_subparser(sub):
    p = sub.add_parser("generate", help="generate completions for a JSONL file of prompts")
    add_engine_args(p)
    p.add_argument("--input", required=True, help="JSONL rows with 'prompt' or 'prompt_token_ids' (with --chat: "
                   "'messages'; with --format openai-batch: OpenAI batch requests)")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--format", choices=["prompts", "openai-batch"], default="prompts",
                   help="openai-batch: rows {custom_id, method, url, body} as the OpenAI Batch API and "
                   "`vllm run-batch` take them, answered with response rows in input order")
    p.add_argument("--chat", action="store_true", help="each row's 'messages' (or --prompt-field) is a "
                   "conversation, rendered by the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, required=True,
                   help="(openai-batch: for rows that set no max_tokens)")
    p.add_argument("--ignore-eos", action="store_true")
    unset = "default: the checkpoint's generation_config.json when it says do_sample, else"
    p.add_argument("--temperature", type=float, help=f"{unset} 0 (greedy)")
    p.add_argument("--top-p", type=float, help=f"{unset} 1")
    p.add_argument("--top-k", type=int, help=f"{unset} 0 (all tokens)")
    p.add_argument("--seed", type=int)
    p.add_argument("--n", type=int, metavar="N", help="samples per prompt, forked from one prefill (default 1); "
                   "rows then carry 'samples': each sample's token_ids, text, finish_reason (the row's own "
                   "fields are sample 0's); with --seed S, sample j of row i draws from S + i * N + j")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--logprobs", type=int, metavar="K", help="rows get 'logprobs': per generated token "
                   "{token id: log-probability} of the chosen token and the K most likely (raw model "
                   "distribution, before temperature/top-k/top-p; K=0: the chosen one only)")
    p.add_argument("--prompt-logprobs", type=int, metavar="K", help="rows get 'prompt_logprobs': the same per "
                   "prompt token given the ones before it (null for the first)")
    p.add_argument("--prompt-field", help="take the prompt text from this field of each row")
    p.add_argument("--template", help="python format string over row fields, e.g. 'Question: {question}\\nAnswer:'")
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--truncate", choices=["left"], help="prompts too long for the context keep their last tokens "
                   "(default: such a prompt is an error naming its row)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_journal_args(p)
    p.set_defaults(func=cmd_generate)
