"""GSM8K-text perplexity (and 0-shot exact match) of dense SmolLM2-135M vs its upcycled MoE fixtures.

    python benchmarks/upcycle_perplexity.py [--rows 200] [--archs mixtral] [--perturb 0.02] [--em 20] [--dtype bfloat16]

Each test row's question + "\\n" + answer is one sequence, scored from its second token on;
perplexity = exp(total NLL / scored tokens), in --dtype (float32 by default; both
systems run in it, so bfloat16 shows what each does with bf16 weights). The dense model runs through transformers
(moegen has no dense Llama); each upcycled checkpoint (`moegen fixture --preset smollm2`, built
under --fixtures-dir on first use) through transformers and through moegen's
Engine.loglikelihood. --em N: exact match on the first N test questions, 0-shot in SmolLM2's chat
template, greedy up to 256 new tokens (dense: transformers generate, one left-padded batch; upcycled: moegen), the last
number of the reply against the answer's "#### N".
"""
import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.checkpoints import upcycle
from moegen.checkpoints.fixture import build_fixture
from moegen.loader import load_model
from moegen.tokenizer import load_tokenizer

MAX_NEW_TOKENS = 256
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> "str | None":
    found = NUMBER.findall(text.split("####")[-1])
    return found[-1].replace(",", "").rstrip(".") if found else None


@torch.inference_mode()
def hf_perplexity(model, seqs) -> float:
    nll = sum(-torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
              .gather(1, torch.tensor(ids[1:])[:, None]).sum().item() for ids in seqs)
    return math.exp(nll / sum(len(ids) - 1 for ids in seqs))


def engine_perplexity(engine, seqs) -> float:
    scores = engine.loglikelihood([(ids[:1], ids[1:]) for ids in seqs])
    return math.exp(-sum(lp for lp, _ in scores) / sum(len(ids) - 1 for ids in seqs))


@torch.inference_mode()
def hf_replies(model, tok, prompts) -> "list[str]":
    """Greedy replies, the prompts left-padded into one batch."""
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return [tok.decode(o[width:], skip_special_tokens=True) for o in out]


def engine_replies(engine, prompts) -> "list[str]":
    return [o.text for o in engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS))]


def exact_match(replies, rows) -> str:
    hits = sum(final_number(r) == final_number(row["answer"]) for r, row in zip(replies, rows))
    return f"{hits}/{len(rows)}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gsm8k", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k"))
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--archs", default="mixtral")
    ap.add_argument("--perturb", type=float, default=upcycle.DEFAULT_PERTURB)
    ap.add_argument("--em", type=int, default=20, help="exact match over this many questions (0: skip)")
    ap.add_argument("--hf-rows", type=int, help="score the upcycled model through transformers on only this many rows "
                    "(default --rows; transformers' MoE is slow on the CPU)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense model")
    ap.add_argument("--fixtures-dir", default="runs/fixtures")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    with open(Path(args.gsm8k) / "test.jsonl") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(max(args.rows, args.em)))]
    dense_dir = upcycle.dense_checkpoint()
    tok = AutoTokenizer.from_pretrained(dense_dir)
    seqs = [tok.encode(r["question"] + "\n" + r["answer"]) for r in rows[:args.rows]]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)) for r in rows[:args.em]]
    print(f"GSM8K test: {len(seqs)} rows, {sum(len(s) - 1 for s in seqs)} scored tokens; {args.dtype}; "
          f"perturb {args.perturb}\n")
    print("| model | via | perplexity | 0-shot EM | s |\n|---|---|---|---|---|", flush=True)
    if not args.no_dense:
        t0 = time.perf_counter()
        dense = LlamaForCausalLM.from_pretrained(dense_dir, dtype=dtype).eval()
        em = exact_match(hf_replies(dense, tok, prompts), rows[:args.em]) if prompts else "-"
        print(f"| dense SmolLM2-135M | transformers | {hf_perplexity(dense, seqs):.4f} | {em} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)
    hf_seqs = seqs[:args.hf_rows]
    for arch in args.archs.split(","):
        path = build_fixture(arch, "smollm2", 0, Path(args.fixtures_dir) / f"{arch}-smollm2-p{args.perturb}",
                             perturb=args.perturb)
        t0 = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        print(f"| {arch} upcycled, first {len(hf_seqs)} rows | transformers | {hf_perplexity(hf, hf_seqs):.4f} | - | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)
        del hf
        t0 = time.perf_counter()
        engine = Engine(load_model(path, args.dtype), load_tokenizer(path), EngineConfig(kv_cache_bytes=512 << 20))
        if len(hf_seqs) < len(seqs):
            print(f"| {arch} upcycled, first {len(hf_seqs)} rows | moegen | {engine_perplexity(engine, hf_seqs):.4f} | - | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)
        ppl = engine_perplexity(engine, seqs)
        em = exact_match(engine_replies(engine, prompts), rows[:args.em]) if prompts else "-"
        print(f"| {arch} upcycled | moegen | {ppl:.4f} | {em} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
