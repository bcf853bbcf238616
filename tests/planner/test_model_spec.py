"""ModelSpec: parameter counts against published sizes and transformers, FLOPs and KV bytes by hand,
and every bundled config's spec against moegen's and transformers' models of it."""
import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from moegen.configs import list_configs, load_config
from moegen.errors import ConfigError, UnsupportedModelError
from moegen.planner.model_spec import MODULES, GQASpec, MLASpec, ModelSpec, _sum_ctx

# name: (published total, published active, count the input embedding in "active"?)
# DeepSeek's "activated" figures leave the input embedding table out; the others count it.
PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9, True),
    "mixtral-8x22b": (141e9, 39e9, True),
    "deepseek-v3": (671e9, 37e9, False),          # main model, the MTP layer excluded
    "deepseek-v2-lite": (15.7e9, 2.4e9, False),
    "qwen3-30b-a3b": (30.5e9, 3.3e9, True),
    "olmoe-1b-7b-0924": (6.9e9, 1.3e9, True),
    "qwen1.5-moe-a2.7b": (14.3e9, 2.7e9, True),
}


def tiny_gqa_spec(**kw) -> ModelSpec:
    """H=4, V=10, one MoE layer, 2 heads / 1 kv head of dim 2, E=4 experts of width 3, top-2."""
    fields = dict(model_type="mixtral", vocab_size=10, hidden_size=4, num_layers=1,
                  attention=GQASpec(n_heads=2, n_kv_heads=1, head_dim=2), num_experts=4, top_k=2,
                  expert_intermediate=3, moe_layer_mask=(True,))
    return ModelSpec(**{**fields, **kw})


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bundled_configs_match_published_sizes(name):
    total, active, with_embedding = PUBLISHED[name]
    spec = ModelSpec.from_config(name)
    assert spec.total_params() == pytest.approx(total, rel=0.02)
    # V2-Lite: 2.45e9 computed vs "2.4B" published (+2.1%), so a hair over 2% here.
    assert spec.active_params_per_token(include_embedding=with_embedding) == pytest.approx(active, rel=0.025)


def test_every_bundled_config_is_listed_and_loads_case_insensitively():
    assert set(PUBLISHED) <= set(list_configs())
    assert load_config("MIXTRAL-8x7B")["hidden_size"] == 4096
    assert load_config("mistralai/Mixtral-8x7B-v0.1") == load_config("mixtral-8x7b")
    with pytest.raises(ConfigError, match="mixtral-8x7b"):
        load_config("no-such-model")


TINY_HF = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4),
    "qwen2_moe": dict(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=56,
                      num_experts=6, mlp_only_layers=[1]),
    "qwen3_moe": dict(intermediate_size=40, moe_intermediate_size=24, head_dim=16, num_experts=6,
                      decoder_sparse_step=2),
    "olmoe": dict(intermediate_size=24, num_experts=6),
    "deepseek_v3": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=2,
                        n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=12, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
    "deepseek_v2": dict(intermediate_size=40, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=2,
                        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                        qk_rope_head_dim=4, v_head_dim=6),
}


@pytest.mark.parametrize("extra", [{}, {"attention_bias": True, "tie_word_embeddings": True}],
                         ids=["plain", "bias-tied"])
@pytest.mark.parametrize("model_type", sorted(TINY_HF))
def test_param_count_equals_transformers_model(model_type, extra):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(model_type, vocab_size=101, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, num_experts_per_tok=2, eos_token_id=1,
                               **TINY_HF[model_type], **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    expected = sum(p.numel() for p in model.parameters())
    # DeepSeek-V3's correction bias is a buffer in transformers but a tensor of the checkpoint
    expected += sum(b.numel() for name, b in model.named_buffers() if "e_score_correction_bias" in name)
    spec = ModelSpec.from_config(cfg)
    assert spec.total_params() == expected
    assert ModelSpec.from_config(cfg.to_dict()) == spec


def test_mixtral_8x7b_modules_by_hand():
    spec = ModelSpec.from_config("mixtral-8x7b")
    layer = spec.layer_params(0)
    assert layer["attention"] == 4096 * 4096 * 2 + 4096 * 1024 * 2          # q, o + k, v
    assert spec.expert_params() == 3 * 4096 * 14336
    assert layer["routed_experts"] == 8 * 3 * 4096 * 14336
    assert layer["router"] == 8 * 4096
    assert layer["shared_experts"] == layer["dense_mlp"] == 0
    assert spec.kv_bytes_per_token(dtype_bytes=2) == 2 * 8 * 128 * 32 * 2     # K+V, 8 kv heads, 32 layers, bf16
    assert spec.weight_bytes(2)["total"] == 2 * spec.total_params()
    assert spec.expert_bytes(2) == 2 * 3 * 4096 * 14336


def test_deepseek_layers_and_mla_cache():
    v3 = ModelSpec.from_config("deepseek-v3")
    assert v3.moe_layers == list(range(3, 61))
    assert v3.kv_bytes_per_token(2) == (512 + 64) * 61 * 2                    # compressed latent + rope key
    assert v3.layer_params(0)["dense_mlp"] == 3 * 7168 * 18432
    assert v3.layer_params(3)["shared_experts"] == 3 * 7168 * 2048
    assert v3.router_params() == 256 * 7168 + 256                             # + e_score_correction_bias
    lite = ModelSpec.from_config("deepseek-v2-lite")
    assert lite.attention.q_lora_rank == 0 and lite.router_params() == 64 * 2048
    # full-rank q_proj, kv_a, kv_b, o_proj, kv_a_layernorm
    assert lite.attention_params() == 2048 * 16 * 192 + 2048 * 576 + 512 * 16 * 256 + 16 * 128 * 2048 + 512


def test_qwen_layouts():
    qwen3 = ModelSpec.from_config("qwen3-30b-a3b")
    assert qwen3.attention.head_dim == 128                                    # explicit, not 2048 / 32
    assert qwen3.kv_bytes_per_token(2) == 2 * 4 * 128 * 48 * 2
    qwen2 = ModelSpec.from_config("qwen1.5-moe-a2.7b")
    assert qwen2.shared_expert_params() == 3 * 2048 * 5632 + 2048             # + shared_expert_gate
    assert qwen2.attention.qkv_bias


def test_tiny_spec_params_by_hand():
    spec = tiny_gqa_spec()
    # q 4x4 + k 4x2 + v 4x2 + o 4x4 = 48; norms 2*4 + final 4; router 4x4; experts 4 * 3*4*3; emb, head 10x4
    assert spec.params_by_module() == {"embedding": 40, "attention": 48, "norms": 12, "router": 16,
                                       "routed_experts": 144, "shared_experts": 0, "dense_mlp": 0, "lm_head": 40}
    assert spec.total_params() == 300
    assert spec.active_params_per_token() == 300 - 144 + 2 * 36
    assert spec.non_expert_bytes(dtype_bytes=1) == 48 + 12 + 16 + 40


def test_tiny_spec_flops_by_hand():
    spec = tiny_gqa_spec()
    # per token: projections 2*48 = 96, router 2*4*4 = 32, top-2 experts 2 * 2*36 = 144, lm_head 2*4*10 = 80
    # attention per key: 2 FLOPs * 2 heads * (2 for q.k + 2 for p.v) = 16
    assert spec.routed_expert_flops() == 144                                 # k experts, not one
    assert spec.decode_flops(7) == 96 + 32 + 144 + 80 + 16 * 7
    # prefill of 3 tokens: 3 * (96+32+144) + 16 * (1+2+3) + lm_head for the last token only
    assert spec.prefill_flops(3) == 3 * 272 + 16 * 6 + 80
    # 3 new tokens: the first from prefill, then decode at contexts 4 and 5
    assert spec.sequence_flops(3, 3) == spec.prefill_flops(3) + spec.decode_flops(4) + spec.decode_flops(5)
    assert spec.kv_read_bytes(5, dtype_bytes=1) == 5 * 4                     # 5 keys x (K+V of 1 head of dim 2)


def test_sliding_window_clips_attention_and_kv_reads():
    spec = tiny_gqa_spec(sliding_windows=(4,))
    assert spec.attn_core_flops(10) == 16 * 4
    assert spec.decode_flops(10) == spec.decode_flops(4)
    assert spec.prefill_flops(6) == 6 * 272 + 16 * (1 + 2 + 3 + 4 + 4 + 4) + 80
    assert spec.kv_read_bytes(10, dtype_bytes=1) == 4 * 4


def test_mla_counts_the_form_the_engine_runs():
    mla = MLASpec(n_heads=2, q_lora_rank=0, kv_lora_rank=4, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=3)
    assert mla.core_flops_per_key(mla_absorbed=True) == 2 * 2 * ((4 + 2) + 4)     # latent+rope scores, latent values
    assert mla.core_flops_per_key(mla_absorbed=False) == 2 * 2 * ((3 + 2) + 3)    # expanded per-head K/V
    spec = tiny_gqa_spec(attention=mla)
    proj = spec.attn_proj_flops()
    # q_proj 4x(2*5) + kv_a 4x(4+2) + kv_b 4x(2*(3+3)) + o (2*3)x4: kv_b is used once per token either way
    assert proj == 2 * (40 + 24 + 48 + 24)
    assert spec.decode_flops(5) - spec.context_free_flops() - spec.lm_head_flops() == 40 * 5
    assert spec.prefill_flops(2) - 2 * spec.context_free_flops() - spec.lm_head_flops() == 32 * (1 + 2)
    assert spec.kv_bytes_per_token(dtype_bytes=2) == (4 + 2) * 1 * 2


@settings(max_examples=60, deadline=None)
@given(prompt=st.integers(0, 40), gen=st.integers(0, 40), window=st.sampled_from([0, 1, 5, 17]))
def test_closed_forms_equal_token_by_token_sums(prompt, gen, window):
    spec = tiny_gqa_spec(sliding_windows=(window,))
    prefill = sum(spec.context_free_flops() + spec.attn_core_flops(c, mla_absorbed=False) for c in range(1, prompt + 1))
    prefill += spec.lm_head_flops() if prompt else 0
    assert spec.prefill_flops(prompt) == prefill
    decode = [spec.decode_flops(c) for c in range(prompt + 1, prompt + gen)]
    assert spec.sequence_flops(prompt, gen) == prefill + sum(decode)
    reads = sum(spec.kv_read_bytes(c) for c in range(prompt + 1, prompt + gen))
    assert spec.decode_kv_read_bytes(prompt, gen) == reads
    assert _sum_ctx(prompt, prompt + gen, window) == sum(min(c, window) if window else c
                                                         for c in range(prompt, prompt + gen + 1))


def test_loads_from_dir_file_and_dict(tmp_path):
    cfg = load_config("olmoe-1b-7b-0924")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = ModelSpec.from_config(cfg)
    assert ModelSpec.from_config(tmp_path) == spec
    assert ModelSpec.from_config(str(tmp_path / "config.json")) == spec


def test_unsupported_type_lists_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="mixtral.*deepseek_v3"):
        ModelSpec.from_config({"model_type": "llama", "hidden_size": 8})


def test_missing_field_is_named():
    cfg = load_config("mixtral-8x7b")
    del cfg["num_local_experts"]
    with pytest.raises(ConfigError, match="num_local_experts"):
        ModelSpec.from_config(cfg)


def test_inconsistent_shapes_are_refused():
    with pytest.raises(ConfigError, match="moe_layer_mask"):
        tiny_gqa_spec(moe_layer_mask=(True, True))
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        tiny_gqa_spec(top_k=5)


# ---- the spec against the models it describes ---------------------------------------------------

def hf_meta_model(cfg):
    """transformers' model of cfg on the meta device: its modules and shapes, no memory."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def tiny_hf_config(model_type: str, **extra):
    from transformers import AutoConfig
    fields = dict(vocab_size=101, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, eos_token_id=1)
    return AutoConfig.for_model(model_type, **{**fields, **TINY_HF[model_type], **extra})


def module_of(name: str) -> str:
    """The MODULES entry a moegen weight name belongs to."""
    if name == "model.embed_tokens.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if ".self_attn." in name:                      # MLA's q_a/kv_a layernorms included
        return "attention"
    if name.endswith("norm.weight"):               # input/post-attention norms, the final norm
        return "norms"
    if ".shared_expert" in name:                   # shared_expert(s).*, Qwen2's shared_expert_gate
        return "shared_experts"
    if ".experts." in name:
        return "routed_experts"
    if ".gate." in name:                           # router weight, DeepSeek-V3's correction bias
        return "router"
    return "dense_mlp"


def params_by_module(shapes: dict, modules) -> dict:
    total = dict.fromkeys(modules, 0)
    for name, shape in shapes.items():
        total[module_of(name)] += math.prod(shape)
    return total


def moegen_model(source):
    from moegen.loader import config_from
    from moegen.models.registry import family
    cfg = config_from(source)
    return family(cfg.model_type).build(cfg)


def assert_spec_counts_every_weight(spec, model):
    """Layer by layer and module by module, the spec's counts are the model's weight shapes."""
    for layer in model.layers:
        expected = params_by_module(layer.weight_shapes(), spec.layer_params(layer.index))
        assert spec.layer_params(layer.index) == expected, layer.index
    assert spec.params_by_module() == params_by_module(model.weight_shapes(), MODULES)
    moe = next(layer.ffn for layer in model.layers if layer.is_moe)
    one_expert = {n: s for n, s in moe.weight_shapes().items() if n.startswith(moe.expert_key(0) + ".")}
    assert spec.expert_bytes(2) == 2 * sum(math.prod(s) for s in one_expert.values())


@pytest.mark.parametrize("name", list_configs())
def test_bundled_spec_counts_every_weight_of_its_model(name):
    assert_spec_counts_every_weight(ModelSpec.from_config(name), moegen_model(name))


@pytest.mark.parametrize("extra", [{}, {"attention_bias": True, "tie_word_embeddings": True}],
                         ids=["plain", "bias-tied"])
@pytest.mark.parametrize("model_type", sorted(TINY_HF))
def test_tiny_spec_counts_every_weight_of_its_model(model_type, extra):
    cfg = tiny_hf_config(model_type, **extra)
    assert_spec_counts_every_weight(ModelSpec.from_config(cfg), moegen_model(cfg))


def hf_attention_shapes(attn) -> dict:
    """Head shapes and per-token KV elements of one transformers attention module."""
    if hasattr(attn, "kv_lora_rank"):              # MLA: the cache holds kv_a_proj's output
        return {"kind": "mla", "n_heads": attn.num_heads, "q_lora_rank": attn.q_lora_rank or 0,
                "kv_lora_rank": attn.kv_lora_rank, "qk_nope_head_dim": attn.qk_nope_head_dim,
                "qk_rope_head_dim": attn.qk_rope_head_dim, "v_head_dim": attn.v_head_dim,
                "kv_elems": attn.kv_a_proj_with_mqa.out_features}
    return {"kind": "gqa", "n_heads": attn.q_proj.out_features // attn.head_dim,
            "n_kv_heads": attn.k_proj.out_features // attn.head_dim, "head_dim": attn.head_dim,
            "kv_elems": attn.k_proj.out_features + attn.v_proj.out_features}


def spec_attention_shapes(a) -> dict:
    if a.kind == "mla":
        return {"kind": "mla", "n_heads": a.n_heads, "q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank,
                "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
                "v_head_dim": a.v_head_dim, "kv_elems": a.kv_elems_per_token()}
    return {"kind": "gqa", "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads, "head_dim": a.head_dim,
            "kv_elems": a.kv_elems_per_token()}


@pytest.mark.parametrize("name", list_configs())
def test_bundled_spec_matches_the_transformers_model(name):
    from moegen.loader import config_from
    spec, hf = ModelSpec.from_config(name), hf_meta_model(config_from(name))
    layers = hf.model.layers
    assert (spec.vocab_size, spec.hidden_size) == tuple(hf.model.embed_tokens.weight.shape)
    assert spec.num_layers == len(layers)
    assert spec.moe_layer_mask == tuple(hasattr(layer.mlp, "experts") for layer in layers)
    moe_shapes = {(layer.mlp.experts.num_experts, layer.mlp.gate.top_k, layer.mlp.experts.intermediate_dim)
                  for layer in layers if hasattr(layer.mlp, "experts")}
    assert moe_shapes == {(spec.num_experts, spec.top_k, spec.expert_intermediate)}
    dense = {layer.mlp.intermediate_size for layer in layers if not hasattr(layer.mlp, "experts")}
    assert dense == ({spec.dense_intermediate} if spec.num_moe_layers < spec.num_layers else set())
    shared = next((getattr(layer.mlp, n) for layer in layers for n in ("shared_expert", "shared_experts")
                   if hasattr(layer.mlp, n)), None)
    assert spec.shared_intermediate == (shared.intermediate_size if shared is not None else 0)
    assert {str(spec_attention_shapes(spec.attention))} == {str(hf_attention_shapes(l.self_attn)) for l in layers}
    expected = sum(p.numel() for p in hf.parameters())
    expected += sum(b.numel() for n, b in hf.named_buffers() if "e_score_correction_bias" in n)
    assert spec.total_params() == expected


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_moe_layers_follow_transformers_not_moe_layer_freq(model_type):
    # DeepSeek's hub code would make layers 1 and 3 dense too (i % moe_layer_freq != 0);
    # transformers reads only first_k_dense_replace, and the model must run what it runs.
    cfg = tiny_hf_config(model_type, num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2)
    hf_kinds = tuple(hasattr(layer.mlp, "experts") for layer in hf_meta_model(cfg).model.layers)
    assert hf_kinds == (False, True, True, True, True)
    assert tuple(layer.is_moe for layer in moegen_model(cfg).layers) == hf_kinds
    assert ModelSpec.from_config(cfg).moe_layer_mask == hf_kinds
    assert ModelSpec.from_config({**cfg.to_dict(), "moe_layer_freq": 2}).moe_layer_mask == hf_kinds
