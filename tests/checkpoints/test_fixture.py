import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moegen.checkpoints.fixture as fx
from moegen.errors import ConfigError
from moegen.checkpoints.fixture import ARCHS, PRESETS, build_fixture, checkpoint_digest, fixture_config


def tensors(ckpt):
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def hf_logits(ckpt, ids=((1, 22557, 1526, 28723, 415),)):
    model, info = AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_loads_in_transformers(tiny_fixture, arch):
    ckpt = tiny_fixture(arch)
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    logits = hf_logits(ckpt)
    assert logits.shape == (1, 5, 32000) and torch.isfinite(logits).all()
    assert logits.std() > 0.2  # the wider init: logits are not all near-equal


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_layout(tiny_fixture, tiny_fused_fixture, arch):
    plain, fused = tensors(tiny_fixture(arch)), tensors(tiny_fused_fixture(arch))
    assert not [k for k in fused if ".experts.0." in k]
    prefix = "model.layers.{}.block_sparse_moe.experts" if arch == "mixtral" else "model.layers.{}.mlp.experts"
    gate, up, down = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    cfg = fixture_config(arch, "tiny")
    fused_layers = [i for i in range(cfg.num_hidden_layers) if prefix.format(i) + ".gate_up_proj" in fused]
    assert fused_layers and all(prefix.format(i) + ".down_proj" in fused for i in fused_layers)
    for i in fused_layers:
        p = prefix.format(i)
        n = sum(1 for k in plain if k.startswith(p + ".") and k.endswith(f".{gate}.weight"))
        want_gu = torch.stack([torch.cat([plain[f"{p}.{e}.{gate}.weight"], plain[f"{p}.{e}.{up}.weight"]])
                               for e in range(n)])
        want_down = torch.stack([plain[f"{p}.{e}.{down}.weight"] for e in range(n)])
        assert torch.equal(fused[p + ".gate_up_proj"], want_gu)  # [E, 2I, H], gate rows first
        assert torch.equal(fused[p + ".down_proj"], want_down)  # [E, H, I]
    # Everything else is untouched.
    assert {k: v for k, v in fused.items() if ".experts." not in k or "shared" in k}.keys() == \
           {k for k in plain if ".experts." not in k or "shared" in k}


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_transformers_loads_fused_layout(tiny_fixture, tiny_fused_fixture, arch):
    assert torch.equal(hf_logits(tiny_fixture(arch)), hf_logits(tiny_fused_fixture(arch)))


def test_same_seed_same_bytes_small_sharded(tmp_path):
    # small is sharded (index path); deepseek_v3 also draws the random routing bias.
    a = build_fixture("deepseek_v3", "small", 7, tmp_path / "a")
    b = build_fixture("deepseek_v3", "small", 7, tmp_path / "b")
    c = build_fixture("deepseek_v3", "small", 8, tmp_path / "c")
    assert len(list(a.glob("*.safetensors"))) > 1 and (a / "model.safetensors.index.json").is_file()
    for f in a.iterdir():
        if f.name != fx.STAMP:
            assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    assert checkpoint_digest(a) != checkpoint_digest(c)


def test_same_seed_same_bytes_fused(tmp_path):
    a = build_fixture("qwen2_moe", "tiny", 3, tmp_path / "a", fused_experts=True)
    b = build_fixture("qwen2_moe", "tiny", 3, tmp_path / "b", fused_experts=True)
    assert checkpoint_digest(a) == checkpoint_digest(b)


def test_rebuild_is_skipped_only_for_same_arguments(tmp_path):
    out = tmp_path / "ckpt"
    build_fixture("mixtral", "tiny", 0, out)
    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    build_fixture("mixtral", "tiny", 0, str(out))
    assert weights.stat().st_mtime_ns == mtime
    before = checkpoint_digest(out)
    build_fixture("mixtral", "tiny", 1, out)
    assert checkpoint_digest(out) != before
    assert json.loads((out / fx.STAMP).read_text())["seed"] == 1
    weights.unlink()  # an incomplete fixture is rebuilt
    build_fixture("mixtral", "tiny", 1, out)
    assert weights.is_file()


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a moegen fixture"):
        build_fixture("mixtral", "tiny", 0, tmp_path)


def test_dtype_default_and_override(tmp_path, tiny_fixture):
    assert fx.DEFAULT_DTYPE == {"tiny": "float32", "small": "float32", "bench": "bfloat16"}
    assert tensors(tiny_fixture("olmoe"))["model.embed_tokens.weight"].dtype == torch.float32
    ckpt = build_fixture("deepseek_v3", "tiny", 0, tmp_path / "bf16", dtype="bf16")
    for name, t in tensors(ckpt).items():
        # transformers keeps DeepSeek's routing bias in float32 (as real checkpoints store it)
        assert t.dtype == (torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16), name
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"


def test_bad_arch_or_preset():
    with pytest.raises(ConfigError) as e:
        build_fixture("llama", "tiny", 0, "/nonexistent")
    assert all(a in str(e.value) for a in ARCHS)
    with pytest.raises(ConfigError) as e:
        fixture_config("mixtral", "huge")
    assert all(p in str(e.value) for p in PRESETS)


def test_bench_mixtral_config():
    c = fixture_config("mixtral", "bench")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (1024, 3584, 8)
    assert (c.num_local_experts, c.num_experts_per_tok) == (8, 2)
    assert (c.num_attention_heads, c.num_key_value_heads) == (16, 4)
    assert (c.vocab_size, c.max_position_embeddings) == (32000, 4096)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", PRESETS)
def test_common_config_fields(arch, preset):
    c = fixture_config(arch, preset)
    assert (c.vocab_size, c.bos_token_id, c.eos_token_id, c.pad_token_id) == (32000, 1, 2, None)
    assert c.tie_word_embeddings is False and c.max_position_embeddings >= 4096
    assert c.initializer_range > 0.02 or preset == "bench"


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_arch_features(preset):
    q2 = fixture_config("qwen2_moe", preset)
    assert q2.qkv_bias and q2.shared_expert_intermediate_size > 0 and not q2.norm_topk_prob
    assert len(q2.mlp_only_layers) == 1
    q3 = fixture_config("qwen3_moe", preset)
    assert q3.head_dim != q3.hidden_size // q3.num_attention_heads and q3.norm_topk_prob
    ol = fixture_config("olmoe", preset)
    assert not ol.norm_topk_prob and (ol.clip_qkv is not None) == (preset == "tiny")
    ds = fixture_config("deepseek_v3", preset)
    assert ds.n_group > 1 and ds.topk_group < ds.n_group and ds.norm_topk_prob and ds.rope_interleave
    assert (ds.first_k_dense_replace, ds.n_shared_experts, ds.routed_scaling_factor) == (1, 1, 2.5)
    assert (ds.q_lora_rank is not None) == (preset == "tiny")
    assert ds.rope_parameters["rope_type"] == ("yarn" if preset == "tiny" else "default")
    for c in (q2, q3, ol):
        assert c.num_key_value_heads < c.num_attention_heads  # GQA


def test_deepseek_tiny_saved_features(tiny_fixture):
    ckpt = tiny_fixture("deepseek_v3")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": 1024, "mscale": 1.0,
                                      "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
    bias = tensors(ckpt)["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert (bias != 0).all()


def test_preset_params_are_exact():
    """PRESET_PARAMS and the module docstring table match the models transformers builds."""
    for arch in ARCHS:
        for preset in PRESETS:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(fixture_config(arch, preset))
            n = sum(t.numel() for t in model.state_dict().values())
            assert fx.PRESET_PARAMS[arch][preset] == n, (arch, preset, n)
            assert f"{n:,}" in fx.__doc__
