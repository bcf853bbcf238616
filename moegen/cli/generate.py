"""`moegen generate`: completions for a JSONL file of prompts."""
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from moegen.engine.options import ENGINE_OPTIONS, LOAD_OPTIONS, add_arguments, values_of
from moegen.errors import InputError
from moegen.generation.job import GenerationJob
from moegen.generation.journal import FLUSH_ROWS, FLUSH_SECONDS, ORDERS, sidecar_path
from moegen.generation.prompts import read_chat_prompts, read_prompts
from moegen.jsonl import STDOUT, output_target
from moegen.recipe import EngineRecipe


def engine_kwargs(args) -> dict:
    """Engine.from_pretrained / from_config keyword arguments from the flags of add_engine_args."""
    return values_of(args, LOAD_OPTIONS + ENGINE_OPTIONS)


def cmd_generate(args):
    check_paths(args)
    if args.format == "openai-batch":
        return cmd_openai_batch(args)
    prompts = read_input(args)
    recipe = EngineRecipe(args.model, args.dummy_weights, engine_kwargs(args))
    # unset --temperature/--top-p/--top-k: the checkpoint's generation_config.json, else greedy
    params = recipe.generation_defaults().params(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, ignore_eos=args.ignore_eos, stop=args.stop or [], logprobs=args.logprobs,
        prompt_logprobs=args.prompt_logprobs, n=args.n)
    summary = generation_job(args, recipe, prompts, params).run(progress=TqdmProgress.maker(args.quiet)).as_dict()
    # with --out - the rows own stdout; the summary goes to stderr
    print(json.dumps(summary, indent=1), file=sys.stderr if args.out == STDOUT else sys.stdout)


def generation_job(args, recipe: EngineRecipe, prompts: list, params) -> GenerationJob:
    return GenerationJob(recipe, prompts, params, args.out, truncate=args.truncate, order=args.order,
                         flush_rows=args.flush_rows, flush_seconds=args.flush_seconds, overwrite=args.overwrite,
                         wait=args.wait, replicas=args.replicas, ray_address=args.ray_address,
                         replica_threads=args.replica_threads)


class TqdmProgress:
    """Rows done/total and ETA (tqdm's), with this run's generated tokens/s."""

    def __init__(self, total: int, resumed: int, quiet: bool = False):
        self.bar = tqdm(total=total, initial=resumed, desc="generate", unit="row", disable=quiet, dynamic_ncols=True)

    @classmethod
    def maker(cls, quiet: bool):
        return lambda total, resumed: cls(total, resumed, quiet)

    def update(self, tally) -> None:
        self.bar.set_postfix_str(f"{tally.tokens_per_s:.1f} tok/s", refresh=False)
        self.bar.update(1)

    def close(self, tally) -> None:
        self.bar.close()


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


def cmd_openai_batch(args) -> None:
    """--format openai-batch: every row of an OpenAI batch file answered through the generation job
    (one engine call, or --replicas engines on Ray; a re-run answers only the rows the output lacks)."""
    from moegen.generation import openai_batch
    if args.logprobs is not None or args.prompt_logprobs is not None:
        raise InputError("--logprobs / --prompt-logprobs are for --format prompts; an OpenAI batch row asks in its "
                         "body (chat: logprobs: true, top_logprobs: K; completions: logprobs: K)")
    if Path(args.out).is_file() and Path(args.out).stat().st_size > 0 and not args.overwrite \
            and not sidecar_path(args.out).exists():
        raise InputError(f"{args.out} exists; replace it with --overwrite, or choose another output (it is no "
                         "journal of a batch run to resume)")
    lines = openai_batch.read_batch(Path(args.input), args.limit)
    recipe = EngineRecipe(args.model, args.dummy_weights, engine_kwargs(args))
    summary = openai_batch.answer_file(
        recipe, lines, args.out, Path(args.model).name, args.max_new_tokens, args.truncate,
        progress=TqdmProgress.maker(args.quiet), overwrite=args.overwrite, wait=args.wait, flush_rows=args.flush_rows,
        flush_seconds=args.flush_seconds, replicas=args.replicas, ray_address=args.ray_address,
        replica_threads=args.replica_threads)
    print(json.dumps(summary, indent=1), file=sys.stderr if args.out == STDOUT else sys.stdout)


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
