"""What experts_kernel=int8 costs in accuracy on trained weights: GSM8K-text perplexity and greedy
agreement of the exact engine and the int8 one over the same checkpoint.

    python benchmarks/int8_experts_accuracy.py --model runs/fixtures/mixtral-smollm2 [--rows 200] [--gen 32]

--model: a bf16-runnable MoE checkpoint with trained weights (`moegen fixture --preset smollm2`
upcycles SmolLM2-135M's). Each of the first --rows GSM8K test rows' question + "\\n" + answer is
one sequence, scored from its second token on: upcycle_perplexity.py's perplexity. Greedy: each
question continued --gen tokens by both engines; reported are the share of sequences identical
throughout and the mean number of leading tokens that agree.
"""
import argparse
import json
from pathlib import Path

from upcycle_perplexity import engine_perplexity     # this folder's: the same perplexity, the same rows

from moegen.engine import Engine, SamplingParams
from moegen.tokenizer import load_tokenizer

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--data", default=str(GSM8K_TEST))
    args = p.parse_args()
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[:args.rows]]
    tok = load_tokenizer(args.model)
    questions = [tok.encode(r["question"] + "\n") for r in rows]
    seqs = [tok.encode(r["question"] + "\n" + r["answer"]) for r in rows]
    params = SamplingParams(max_new_tokens=args.gen, ignore_eos=True)
    result = {}
    for kernel in ("fused", "int8"):
        engine = Engine.from_pretrained(args.model, dtype="bfloat16", experts_kernel=kernel)
        tokens = [c.token_ids for c in engine.generate(questions, params)]
        result[kernel] = {"perplexity": engine_perplexity(engine, seqs), "tokens": tokens}
        del engine
    exact, int8 = result["fused"]["tokens"], result["int8"]["tokens"]

    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    print(json.dumps({
        "model": args.model, "rows": len(rows), "scored_tokens": sum(len(s) - 1 for s in seqs),
        "perplexity_exact": round(result["fused"]["perplexity"], 4),
        "perplexity_int8": round(result["int8"]["perplexity"], 4),
        "greedy_identical": sum(a == b for a, b in zip(exact, int8)) / len(exact),
        "greedy_mean_agreeing_prefix": sum(common(a, b) for a, b in zip(exact, int8)) / len(exact),
        "gen": args.gen}, indent=1))


if __name__ == "__main__":
    main()
