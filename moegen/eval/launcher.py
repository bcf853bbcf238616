"""The lm-eval launcher behind `moegen lm-eval ARGS` and `python -m moegen.lm_eval ARGS`: lm-eval's own
command line, with the `moegen` model registered and moegen's offline tasks on the task search path.

    moegen lm-eval --model moegen --model_args pretrained=DIR,dtype=float32 --tasks gsm8k_local \\
        --apply_chat_template --log_samples --output_path runs/lm-eval --use_cache runs/lm-eval/cache

lm-eval has no plugin mechanism for outside models: a model registers when its module is
imported, so this launcher imports moegen.eval.lm_eval_backend and then runs lm-eval's CLI (the steps
of lm_eval.__main__.cli_evaluate, with the parsed arguments amended in between). Every argument
is lm-eval's and means what lm-eval documents, with two defaults made to fit:
- --include_path: moegen/eval/tasks is always searched, besides any path given;
- --device: when not given, the model_args' device, else cuda:0 where CUDA is available, else
  cpu with a warning (lm-eval's own default is cuda:0 everywhere).
- --use_cache C: lm-eval keys its cache by the request alone, so a cache written by another model
  would answer for this one. Here it is namespaced by what decides the answers: the model and its
  model_args (dtype, ...) and the checkpoint's fingerprint (moegen.checkpoints.fingerprints: weights,
  config, tokenizer, chat template). The cache file is C-<key>_rank0.db: another model, dtype or
  checkpoint gets a cache of its own, and the same run resumes from its own.
lm-eval's own errors (an unknown task, a bad argument) are one line, as every moegen error:
`moegen --debug lm-eval ...` shows the traceback.
"""
import argparse
import contextlib
import hashlib
import importlib
import json
import logging
import sys

from moegen.errors import MachineFault, MoegenError

log = logging.getLogger("moegen")
# what lm-eval raises for a user's mistake (an unknown task, a malformed argument or file)
USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


class LmEvalError(MoegenError):
    """lm-eval refused the run (an unknown task, a bad argument)."""


class LmEvalFault(MachineFault):
    """lm-eval failed for another reason (memory, a device, a disk)."""


def launch(argv: "list[str]") -> None:
    """Run lm-eval's CLI on argv (the arguments after `lm-eval`)."""
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.utils import setup_logging

    importlib.import_module("moegen.eval.lm_eval_backend")   # registers the lm-eval model "moegen"
    setup_logging()
    saved, sys.argv = sys.argv, ["lm-eval", *argv]     # lm-eval parses sys.argv itself
    try:
        cli = HarnessCLI()
        args = cli.parse_args()
        amend(args)
        with cache_namespaced(), lm_eval_errors():
            cli.execute(args)
    finally:
        sys.argv = saved


@contextlib.contextmanager
def lm_eval_errors():
    """lm-eval's exceptions as one line (module doc); moegen's own pass as they are."""
    try:
        yield
    except (MoegenError, KeyboardInterrupt, SystemExit):
        raise
    except USER_ERRORS as e:
        raise LmEvalError(f"lm-eval: {first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 -- anything else lm-eval or a backend raised: one line too
        raise LmEvalFault(f"lm-eval failed: {type(e).__name__}: {first_line(e)}") from e


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def cache_namespaced():
    """lm-eval's CLI calls lm_eval.simple_evaluate with its final settings (flags and any
    --config file merged): give use_cache its namespace there (module doc)."""
    import lm_eval
    from lm_eval.evaluator import simple_evaluate

    def namespaced(*args, **kwargs):
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = cache_path(kwargs["use_cache"], kwargs.get("model"), kwargs.get("model_args"))
        return simple_evaluate(*args, **kwargs)

    lm_eval.simple_evaluate = namespaced      # shadows the module's lazy attribute while we run
    try:
        yield
    finally:
        del lm_eval.simple_evaluate


def cache_path(use_cache: str, model, model_args) -> str:
    key = cache_key(model, model_args)
    path = f"{use_cache}-{key}"
    log.info("--use_cache %s: this model's cache is %s_rank*.db (keyed by model, model_args and checkpoint "
             "fingerprint)", use_cache, path)
    return path


def cache_key(model, model_args) -> str:
    """16 hex digits over what decides a model's answers (module doc)."""
    from lm_eval.utils import simple_parse_args_string

    from moegen.checkpoints.fingerprints import checkpoint_fingerprint

    args = simple_parse_args_string(model_args) if isinstance(model_args, str) else dict(model_args or {})
    if model == "moegen":
        from moegen.engine.config import DTYPE
        args.setdefault("dtype", DTYPE.default)     # an unset dtype is still a dtype: name it
    checkpoint = args.get("pretrained")
    blob = {"model": str(model), "model_args": {k: str(v) for k, v in sorted(args.items())},
            "checkpoint": checkpoint_fingerprint(checkpoint) if isinstance(checkpoint, str) else None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def amend(args: argparse.Namespace) -> None:
    """Our task directory on the search path; a --device that fits this machine (module doc)."""
    from moegen.eval.tasks import TASKS_DIR

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
