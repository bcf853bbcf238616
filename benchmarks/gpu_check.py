"""GPU check of the engine: exactness with weights streamed under a device budget smaller than
the model, and throughput vs transformers, in one run. Needs CUDA.

    PYTHONPATH=. python benchmarks/gpu_check.py [--out results.json]

Checkpoints are written from the fixture configs with transformers (random weights), so the
script needs no tokenizer package; prompts are random token ids.
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.harness.fixture import ARCHS, fixture_config
from moegen.loader import load_model


def write_checkpoint(arch: str, preset: str, out: str, dtype=torch.float32) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(fixture_config(arch, preset)).to(dtype)
    model.save_pretrained(out)
    return out


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.weights.values())


@torch.inference_mode()
def exactness(arch: str, new_tokens: int = 32) -> dict:
    path = write_checkpoint(arch, "small", f"/tmp/moegen-gpu/{arch}")
    model = load_model(path, "float32")
    top = sum(model.weights[n].numel() * 4 for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"))
    # room for embeddings/lm_head, 3 buffers and a third of the layers: the rest streams
    budget = top + 3 * (1 << 20) + (model_bytes(model) - top) // 3
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, 32000, (n,), generator=g).tolist() for n in (5, 17, 33, 9, 64, 12, 100, 3)]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    refs = [hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=new_tokens, do_sample=False,
                        eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    del hf
    engine = Engine(model, None, EngineConfig(device="cuda", device_memory=budget, num_buffers=3,
                                              max_batch=3, attn_micro_batch=2, kv_cache_bytes=256 << 20))
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    matches = sum(o.token_ids == r for o, r in zip(outs, refs))
    first_div = [next((i for i, (a, b) in enumerate(zip(o.token_ids, r)) if a != b), None) for o, r in zip(outs, refs)]
    s = engine.streamer
    return {"arch": arch, "prompts": len(prompts), "exact_matches": matches, "first_divergence": first_div,
            "model_bytes": model_bytes(model), "device_budget_bytes": budget,
            "resident_modules": len(s.resident), "streamed_modules": len(s.groups) - len(s.resident),
            "bytes_streamed": s.stats.bytes_moved, "experts_skipped": engine.stats.experts_skipped}


@torch.inference_mode()
def throughput(n: int, prompt_len: int, gen: int) -> dict:
    path = write_checkpoint("mixtral", "bench", "/tmp/moegen-gpu/mixtral-bench", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 32000, (prompt_len - 1,), generator=g).tolist() for _ in range(n)]
    params = SamplingParams(max_new_tokens=gen, ignore_eos=True)
    rows = {}
    for label, budget in (("moegen-streamed", 600 << 20), ("moegen-resident", None)):
        model = load_model(path, "bfloat16")
        engine = Engine(model, None, EngineConfig(device="cuda", device_memory=budget, max_batch=n,
                                                  attn_micro_batch=128, kv_cache_bytes=8 << 30))
        engine.generate(prompts[:8], SamplingParams(max_new_tokens=2, ignore_eos=True))   # warm up
        engine.reset_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        wall = time.perf_counter() - t0
        st = engine.stats
        rows[label] = {"e2e_tok_s": n * gen / wall, "prefill_tok_s": st.prefill_tok_s, "decode_tok_s": st.decode_tok_s,
                       "wall_s": wall, "bytes_streamed": engine.streamer.stats.bytes_moved,
                       "model_bytes": model_bytes(model), "device_budget": budget, "attention": st.attention}
        rows[label]["tokens"] = [o.token_ids for o in outs[:4]]
        print(label, {k: v for k, v in rows[label].items() if k != "tokens"}, flush=True)
        del engine, model
        torch.cuda.empty_cache()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    best = None
    for bs in (16, 64, 256):
        batch = torch.tensor(prompts[:bs], device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=gen, min_new_tokens=gen,
                    do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        tok_s = bs * gen / (time.perf_counter() - t0)
        rows[f"hf-generate-bs{bs}"] = {"e2e_tok_s": tok_s}
        print("hf", bs, tok_s, flush=True)
        best = max(best or 0, tok_s)
    rows["ratio_streamed_vs_hf_best"] = rows["moegen-streamed"]["e2e_tok_s"] / best
    rows["ratio_resident_vs_hf_best"] = rows["moegen-resident"]["e2e_tok_s"] / best
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "exactness": []}
    for arch in args.archs.split(","):
        result["exactness"].append(exactness(arch))
        print(json.dumps(result["exactness"][-1]), flush=True)
    if not args.skip_throughput:
        result["throughput"] = throughput(args.n, 128, 64)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
