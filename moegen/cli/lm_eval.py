"""`moegen lm-eval ARGS` (and `python -m moegen.lm_eval ARGS`): lm-eval's own command line, with
the `moegen` model registered and moegen's offline tasks on the task search path.

    moegen lm-eval --model moegen --model_args pretrained=DIR,dtype=float32 --tasks gsm8k_local \\
        --apply_chat_template --log_samples --output_path runs/lm-eval --use_cache runs/lm-eval/cache

lm-eval has no plugin mechanism for outside models: a model registers when its module is
imported, so this launcher imports moegen.harness.lm_eval and then runs lm-eval's CLI (the steps
of lm_eval.__main__.cli_evaluate, with the parsed arguments amended in between). Every argument
is lm-eval's and means what lm-eval documents, with two defaults made to fit:
- --include_path: moegen/harness/lm_eval_tasks is always searched, besides any path given;
- --device: when not given, the model_args' device, else cuda:0 where CUDA is available, else
  cpu with a warning (lm-eval's own default is cuda:0 everywhere).
"""
import argparse
import importlib
import logging
import sys

log = logging.getLogger("moegen")


def cmd_lm_eval(args) -> None:
    launch(args.lm_eval_args)


def launch(argv: "list[str]") -> None:
    """Run lm-eval's CLI on argv (the arguments after `lm-eval`)."""
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.utils import setup_logging

    importlib.import_module("moegen.harness.lm_eval")   # registers the lm-eval model "moegen"
    setup_logging()
    saved, sys.argv = sys.argv, ["lm-eval", *argv]     # lm-eval parses sys.argv itself
    try:
        cli = HarnessCLI()
        args = cli.parse_args()
        amend(args)
        cli.execute(args)
    finally:
        sys.argv = saved


def amend(args: argparse.Namespace) -> None:
    """Our task directory on the search path; a --device that fits this machine (module doc)."""
    from moegen.harness.lm_eval_tasks import TASKS_DIR

    if hasattr(args, "include_path"):
        args.include_path = [str(TASKS_DIR), *([args.include_path] if args.include_path else [])]
    if hasattr(args, "device") and not args.device and not getattr(args, "config", None):
        args.device = (args.model_args or {}).pop("device", None) or default_device()


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda:0"
    log.warning("no CUDA device: running on cpu (pass --device to choose)")
    return "cpu"


def add_subparser(sub):
    # no options of its own (not even -h): every argument goes to lm-eval untouched
    p = sub.add_parser("lm-eval", help="lm-eval's own CLI with the moegen model and local tasks "
                       "(`moegen lm-eval --help` shows lm-eval's help)", add_help=False, prefix_chars="\0")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)
