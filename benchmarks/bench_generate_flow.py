"""The `generate` flow end to end against bare `Engine.generate` on the same prompts, in one process.

    moegen fixture --arch mixtral --preset bench --seed 0 --out runs/fixtures/mixtral-bench
    python benchmarks/bench_generate_flow.py --model runs/fixtures/mixtral-bench

The 1,319 GSM8K test questions (the flow's `gsm8k` template), --gen new tokens each with EOS
ignored, bf16. Three measurements of generated tokens/s: bare `Engine.generate` on all prompts in
one call; the same engine fed 64 prompts per call (the old flow's shards, for the record); and the
`generate` flow (its journal, progress artifact and report; its own engine; generation time as
the flow measures it, and its wall time with model load and Prefect). Prints each and the ratio
flow / bare (issue #13 asks for >= 0.95). Not a test: run it on a quiet machine.
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SHARD = 64


def gsm8k_prompts(gsm8k_dir: Path, template: str, limit: int | None) -> list[str]:
    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines() if line.strip()]
    return [template.format(**row) for row in rows[:limit]]


def bare_tok_s(engine, prompts: list[str], params, per_call: int | None = None) -> float:
    """Generated tokens/s of engine.generate over the prompts, all at once or per_call at a time."""
    step = per_call or len(prompts)
    t0, generated = time.perf_counter(), 0
    for start in range(0, len(prompts), step):
        generated += sum(len(c.token_ids) for c in engine.generate(prompts[start:start + step], params))
    return generated / (time.perf_counter() - t0)


def start_prefect() -> None:
    """Prefect's temporary server, started now by a flow that does nothing, so that its start is
    not counted in the generate flow's wall time."""
    for key, value in {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(key, value)
    from prefect import flow
    flow(name="warm-up")(lambda: None)()


def flow_tok_s(model: str, gsm8k_dir: Path, template: str, limit: int | None, gen: int,
               dtype: str) -> tuple[float, float]:
    """(generated tokens/s as the flow measures its generation, the same over the flow's wall time)."""
    from flows.generate import generate_flow
    with tempfile.TemporaryDirectory() as out_dir:
        t0 = time.perf_counter()
        summary = generate_flow(model=model, dataset=str(gsm8k_dir), template=template, limit=limit, out_dir=out_dir,
                                dtype=dtype, record=False, sampling={"max_new_tokens": gen, "ignore_eos": True})
        wall_s = time.perf_counter() - t0
    return summary["e2e_tokens_per_s"], summary["generated_tokens"] / wall_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/fixtures/mixtral-bench")
    ap.add_argument("--gsm8k", default=os.environ.get("MOEGEN_GSM8K_DIR", "../shared/data/gsm8k"))
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--limit", type=int, help="only the first N questions (a quick check of the script)")
    ap.add_argument("--no-shards", action="store_true", help="skip the 64-per-call measurement (the slowest)")
    args = ap.parse_args()
    from moegen.engine import Engine, SamplingParams
    from moegen.bench.workloads import DEFAULT_TEMPLATE

    gsm8k_dir = Path(args.gsm8k).resolve()
    prompts = gsm8k_prompts(gsm8k_dir, DEFAULT_TEMPLATE, args.limit)
    params = SamplingParams(max_new_tokens=args.gen, ignore_eos=True)
    engine = Engine.from_pretrained(args.model, dtype=args.dtype)
    bare = bare_tok_s(engine, prompts, params)
    print(f"bare Engine.generate, {len(prompts)} prompts in one call: {bare:.1f} tok/s", flush=True)
    if not args.no_shards:
        shards = bare_tok_s(engine, prompts, params, per_call=SHARD)
        print(f"bare Engine.generate, {SHARD} prompts per call (the old flow's shards): {shards:.1f} tok/s "
              f"({shards / bare:.2f}x)", flush=True)
    del engine                                    # the flow loads its own
    start_prefect()
    generation, end_to_end = flow_tok_s(str(Path(args.model).resolve()), gsm8k_dir, DEFAULT_TEMPLATE, args.limit,
                                        args.gen, args.dtype)
    print(f"generate flow: {generation:.1f} tok/s over its generation ({generation / bare:.2f}x bare), "
          f"{end_to_end:.1f} over its wall time with load and Prefect ({end_to_end / bare:.2f}x)")


if __name__ == "__main__":
    main()
