"""The disk tier's benchmark (issue 26): a bf16 checkpoint larger than this machine's RAM, run by
moegen under a --host-memory well below RAM, and the same prompts through llama.cpp (bf16 GGUF of
the same weights, mmap, 256 slots).

    python benchmarks/bench_disk_tier.py write --out DIR [--layers 22]
    moegen probe --disk DIR
    moegen plan --model DIR --host-memory 16GiB --prompt-len 48 --gen-len 64 --num-seqs 1024
    moegen bench --model DIR --dtype bfloat16 --systems moegen \\
        --workload synthetic:prompt=48,gen=64,n=1024,seed=7 --opt moegen.host_memory=16GiB --json moegen.json
    moegen bench --model DIR --dtype bfloat16 --systems llama.cpp \\
        --workload synthetic:prompt=48,gen=64,n=256,seed=7 --opt llama.cpp.ubatch=2048 --json llama.json

llama.cpp takes the first 256 of the same prompts (the same seed draws them first). The figures:
docs/performance.md, "Models bigger than host memory" (~20 min for moegen, ~40 for llama.cpp here).

`write` makes the checkpoint shard by shard, one decoder layer per shard, so that no more than one
layer is ever in memory: Mixtral's architecture (which llama.cpp's converter and the Mixtral
tokenizer moegen's fixtures ship both take as is) with Qwen3-30B-A3B's layer shape: hidden 2048,
32 query / 4 KV heads of 128, 128 experts of width 768, top-8. Weights are slices of one random
pool (normal, std 0.02) at random offsets: every tensor differs, and writing costs disk time, not
random-number time. Norms are one.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=768, num_attention_heads=32,
             num_key_value_heads=4, head_dim=128, num_local_experts=128, num_experts_per_tok=8,
             max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
POOL_ELEMS = 80 << 20          # bf16 values the tensors are cut from (the embedding is 65.5 M)


def config(layers: int):
    from transformers import MixtralConfig
    return MixtralConfig(num_hidden_layers=layers, dtype="bfloat16", architectures=["MixtralForCausalLM"], **SHAPE)


class Slicer:
    """Tensors cut from one random pool at random offsets (each a contiguous copy, as safetensors
    stores it)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(POOL_ELEMS, generator=self.g) * 0.02).bfloat16()

    def __call__(self, *shape) -> torch.Tensor:
        n = shape[0] * (shape[1] if len(shape) > 1 else 1)
        start = int(torch.randint(0, POOL_ELEMS - n + 1, (1,), generator=self.g))
        return self.pool[start:start + n].view(shape).clone()


def layer_tensors(i: int, cut: Slicer) -> dict:
    h, d, q, kv = SHAPE["hidden_size"], SHAPE["head_dim"], SHAPE["num_attention_heads"], SHAPE["num_key_value_heads"]
    inter, experts, p = SHAPE["intermediate_size"], SHAPE["num_local_experts"], f"model.layers.{i}"
    out = {f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
           f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
           f"{p}.self_attn.q_proj.weight": cut(q * d, h), f"{p}.self_attn.k_proj.weight": cut(kv * d, h),
           f"{p}.self_attn.v_proj.weight": cut(kv * d, h), f"{p}.self_attn.o_proj.weight": cut(h, q * d),
           f"{p}.block_sparse_moe.gate.weight": cut(experts, h)}
    for e in range(experts):
        x = f"{p}.block_sparse_moe.experts.{e}"
        out.update({f"{x}.w1.weight": cut(inter, h), f"{x}.w2.weight": cut(h, inter), f"{x}.w3.weight": cut(inter, h)})
    return out


def write(out: Path, layers: int, seed: int) -> None:
    from moegen.checkpoints.fixture import _write_tokenizer
    out.mkdir(parents=True, exist_ok=True)
    config(layers).save_pretrained(out)
    cut, weight_map, total, t0 = Slicer(seed), {}, 0, time.perf_counter()
    h, v = SHAPE["hidden_size"], SHAPE["vocab_size"]
    shards = layers + 1
    for s in range(shards):
        if s == 0:
            tensors = {"model.embed_tokens.weight": cut(v, h), "lm_head.weight": cut(v, h),
                       "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
        else:
            tensors = layer_tensors(s - 1, cut)
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        print(f"wrote {name}: {total / 2**30:.1f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    _write_tokenizer(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the checkpoint shard by shard")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--layers", type=int, default=22, help="22 layers: 25.8 GiB")
    w.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    write(args.out, args.layers, args.seed)


if __name__ == "__main__":
    main()
