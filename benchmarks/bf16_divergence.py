"""Where does bfloat16 greedy generation first leave transformers' bfloat16 tokens, per arch?

    python benchmarks/bf16_divergence.py [--gsm8k ../shared/data/gsm8k] [--n 8] [--new 32]

Random-weight fixtures have near-tied logits, so bf16 rounding (which differs between any two
implementations: fused vs per-expert GEMMs, summation order) flips greedy choices sooner or
later; float32 matches token for token (tests/engine/test_engine.py). This prints, per architecture,
the first diverging position of each prompt and the max logit difference on the prompts.
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.checkpoints.fixture import ARCHS, build_fixture
from moegen.loader import load_model
from moegen.tokenizer import load_tokenizer


def first_divergence(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gsm8k", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--archs", default=",".join(ARCHS))
    args = ap.parse_args()
    with open(Path(args.gsm8k) / "test.jsonl") as f:
        questions = [json.loads(next(f))["question"] for _ in range(args.n)]
    tmp = Path(tempfile.mkdtemp())
    for arch in args.archs.split(","):
        path = build_fixture(arch, "tiny", 0, tmp / arch)
        tok = load_tokenizer(path)
        prompts = [tok.encode(q) for q in questions]
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        with torch.inference_mode():
            refs = [hf.generate(torch.tensor([p]), max_new_tokens=args.new, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(p):].tolist() for p in prompts]
            ref_logits = [hf(torch.tensor([p])).logits[0].float() for p in prompts]
        model = load_model(path, "bfloat16")
        ours = model.forward(prompts)
        logit_err = max(float((o.float() - r).abs().max() / r.abs().max()) for o, r in zip(ours, ref_logits))
        outs = Engine(model, tok, EngineConfig(max_batch=len(prompts), attn_micro_batch=0, max_prefill_tokens=8192,
                                               kv_cache_bytes=64 << 20)).generate(
            prompts, SamplingParams(max_new_tokens=args.new, ignore_eos=True))
        divs = [first_divergence(o.token_ids, r) for o, r in zip(outs, refs)]
        same = sum(d is None for d in divs)
        print(f"{arch:12s} identical {same}/{len(prompts)}  first divergence per prompt {divs}  "
              f"max |logit diff| / max |logit| on prompts {logit_err:.4f}")


if __name__ == "__main__":
    main()
