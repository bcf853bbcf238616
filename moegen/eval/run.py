"""Run lm-eval tasks on a checkpoint with moegen (or, for comparison, lm-eval's own `hf` backend).

    from moegen.eval.run import run_eval
    res = run_eval("ckpt/", ["gsm8k_local"], limit=20, dtype="float32")
    res["results"]["gsm8k_local"]["exact_match,strict-match"], res["samples"]["gsm8k_local"][0]

The offline task configs in `moegen/eval/tasks/` are always on the include path; their GSM8K
files are found and validated before lm-eval runs (see `moegen.eval.tasks.gsm8k_data`).
"""
import difflib
import time
from pathlib import Path

from moegen.errors import ConfigError, InputError
from moegen.jsonl import json_safe
from moegen.eval.tasks import LOCAL_TASKS, TASKS_DIR

SYSTEMS = ("moegen", "hf")
# hf's batch size: generation costs per decode step (bigger is faster), but loglikelihood holds
# full-vocabulary log-probs per batch (16 x 1k tokens x 32k vocab x 4 B x 2 ~ 4 GB); engine_options
# {"batch_size": N} overrides it
HF_BATCH_SIZE = 16
HF_OPTIONS = ("batch_size",)
_GSM8K_NAMES = {*LOCAL_TASKS, "moegen_local"}  # names (tasks, tag) that read the GSM8K files


def run_eval(model, tasks, limit=None, system="moegen", dtype="bfloat16", device="cpu", num_fewshot=None,
             include_path=None, engine_options=None, gen_kwargs=None) -> dict:
    """Evaluate checkpoint `model` on lm-eval `tasks` (names, or one comma-separated string).

    Returns a JSON-safe dict: lm-eval's `results`, `versions`, `n-shot`, `n-samples`, `configs`,
    plus `samples`: per task, one record per (document, filter) with doc_id, target, response,
    filtered_response, prompt_hash and metric values; `system`, `model`, `wall_s`; and for
    moegen `engine`: the engine's token counts and throughput.

    engine_options: for moegen, Engine options (max_batch, attn_micro_batch, host_memory, ...);
    for hf, only `batch_size`. gen_kwargs: overrides of the generation tasks' settings, as a dict
    or lm-eval's "max_gen_toks=64,temperature=0" string.
    """
    _check_system(system)
    model_dir = _check_model_dir(model)
    check_counts(limit, num_fewshot)
    names = task_names(tasks)
    manager = task_manager(names, include_paths(include_path))
    if _GSM8K_NAMES & set(names):
        from moegen.eval.tasks import gsm8k_data
        gsm8k_data.check_files()
    if num_fewshot:
        check_fewshot_pools(names, manager, num_fewshot)
    lm = make_lm(system, model_dir, dtype, device, engine_options)
    result = evaluate(lm, names, manager, limit, num_fewshot, gen_kwargs, system=system, model=str(model_dir))
    if system == "moegen":
        result["engine"] = engine_summary(lm.engine)
    return result


def engine_summary(engine) -> dict:
    """Throughput of everything the engine ran for this evaluation."""
    return engine.stats.as_dict(("prefill_tokens", "decode_tokens", "prefill_tok_s", "decode_tok_s", "attention"))


def evaluate(lm, names, manager, limit=None, num_fewshot=None, gen_kwargs=None, **info) -> dict:
    """simple_evaluate on an already built lm-eval model; the result made JSON-safe."""
    import lm_eval

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit,
                                  gen_kwargs=gen_kwargs or None, task_manager=manager, log_samples=True)
    wall = time.perf_counter() - t0
    keep = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples", "configs")
    result = {**info, "tasks": list(names), "limit": limit, "num_fewshot": num_fewshot, "gen_kwargs": gen_kwargs,
              "wall_s": round(wall, 2)}
    result.update({k: out[k] for k in keep if k in out})
    result["samples"] = {task: [sample_record(s) for s in samples] for task, samples in out["samples"].items()}
    return json_safe(result)


def sample_record(sample: dict) -> dict:
    """The parts of one lm-eval logged sample worth keeping (not the doc nor the prompt)."""
    resps = [r[0] if len(r) == 1 else r for r in sample["resps"]]
    filtered = sample["filtered_resps"]
    return {"doc_id": sample["doc_id"], "filter": sample["filter"], "target": sample["target"],
            "response": resps[0] if len(resps) == 1 else resps,
            "filtered_response": filtered[0] if len(filtered) == 1 else filtered,
            "prompt_hash": sample.get("prompt_hash"),
            "metrics": {m: sample[m] for m in sample["metrics"] if m in sample}}


# --- checks ---------------------------------------------------------------------------------------
def _check_system(system: str) -> None:
    if system not in SYSTEMS:
        raise ConfigError(f"unknown system {system!r}; choose one of {', '.join(SYSTEMS)}")


def check_counts(limit, num_fewshot) -> None:
    """--limit and --num-fewshot that lm-eval would crash on (or record as they are)."""
    if limit is not None and not (isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 0):
        raise InputError(f"--limit must be at least 1 (documents per task), got {limit}")
    if num_fewshot is not None and not (isinstance(num_fewshot, int) and not isinstance(num_fewshot, bool)
                                        and num_fewshot >= 0):
        raise InputError(f"--num-fewshot must be 0 or more, got {num_fewshot}")


def check_fewshot_pools(names, manager, num_fewshot: int) -> None:
    """Each task must have num_fewshot examples to draw from (lm-eval's sampler would crash)."""
    for name, task in manager.load(list(names))["tasks"].items():
        docs = task.fewshot_docs() if hasattr(task, "fewshot_docs") else None
        if docs is not None and num_fewshot > len(docs):
            raise InputError(f"--num-fewshot {num_fewshot}: task {name} has only {len(docs)} examples to draw "
                             "few-shot from")


def _check_model_dir(model) -> Path:
    d = Path(model)
    if not (d / "config.json").is_file():
        raise ConfigError(f"{d}: not a checkpoint directory (no config.json)")
    return d


def task_names(tasks) -> "list[str]":
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise InputError("no tasks given")
    return names


def include_paths(include_path) -> "list[Path]":
    extra = [] if include_path is None else include_path if isinstance(include_path, (list, tuple)) else [include_path]
    paths = [TASKS_DIR]
    for p in map(Path, extra):
        if not p.is_dir():
            raise ConfigError(f"include path {p} is not a directory")
        paths.append(p.resolve())
    return paths


def task_manager(names, include_paths):
    """A TaskManager that knows every name in `names`. lm-eval's own task index takes seconds
    to build, so it is consulted only for names the include paths lack."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_paths], include_defaults=False)
    if set(names) <= set(manager.all_tasks):
        return manager
    manager = TaskManager(include_path=[str(p) for p in include_paths])
    missing = [n for n in names if n not in set(manager.all_tasks)]
    if missing:
        raise InputError(unknown_tasks_message(missing, manager.all_tasks))
    return manager


def unknown_tasks_message(missing, known) -> str:
    parts = []
    for name in missing:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return (f"unknown task {'; '.join(parts)}. Local offline tasks: {', '.join(LOCAL_TASKS)}; "
            f"other lm-eval tasks need their data in the Hugging Face cache (we run offline)")


# --- models ---------------------------------------------------------------------------------------
def make_lm(system: str, model_dir: Path, dtype: str, device: str, engine_options=None):
    if system == "moegen":
        from moegen.eval.lm_eval_backend import MoegenLM   # importing it also registers "moegen" with lm-eval
        return MoegenLM(pretrained=str(model_dir), dtype=dtype, device=device, **(engine_options or {}))
    options = dict(engine_options or {})
    unknown = sorted(set(options) - set(HF_OPTIONS))
    if unknown:
        raise ConfigError(f"options {unknown} apply to system 'moegen' only; system 'hf' takes {', '.join(HF_OPTIONS)}")
    from lm_eval.models.huggingface import HFLM
    # greedy: lm-eval's generate_until default (do_sample false / temperature 0) on both sides
    return HFLM(pretrained=str(model_dir), dtype=dtype, device=device,
                batch_size=int(options.get("batch_size", HF_BATCH_SIZE)))
