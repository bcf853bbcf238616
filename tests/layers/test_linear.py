"""Packed GEMM weights: bit-identical to F.linear, packed only where asked, same engine tokens."""
import pytest
import torch
import torch.nn.functional as F

from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.errors import InputError
from moegen.checkpoints.fixture import ARCHS
from moegen.layers.linear import linear, pack_weight, packing_supported, prepack
from moegen.loader import load_model
from moegen.tokenizer import load_tokenizer
from tests.hf_reference import gsm8k_questions

BF16_PACKING = packing_supported(torch.bfloat16)
needs_packing = pytest.mark.skipif(not BF16_PACKING, reason="this CPU/torch has no oneDNN bf16 GEMM to pack for")


@needs_packing
@pytest.mark.parametrize("rows", [1, 3, 17, 128, 259, 722])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_is_bit_identical(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(384, 256, generator=g).bfloat16()
    b = torch.randn(384, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, 256, generator=g).bfloat16()
    packed = pack_weight(w)
    assert packed.is_mkldnn and packed.shape == w.shape
    assert torch.equal(linear(x, packed, b), F.linear(x, w, b))
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))        # plain weights: plain path


@needs_packing
def test_prepack_packs_named_supported_weights_only():
    weights = {"a": torch.randn(8, 4).bfloat16(), "b": torch.randn(8, 4).bfloat16(),
               "f32": torch.randn(8, 4), "vec": torch.randn(8).bfloat16()}
    assert prepack(weights, ["a", "f32", "vec"]) == 1
    assert weights["a"].is_mkldnn and not weights["b"].is_mkldnn
    assert not weights["f32"].is_mkldnn and not weights["vec"].is_mkldnn
    assert prepack(weights, ["a"]) == 0                           # already packed


def test_linear_weight_names_exist_and_exclude_lookups(tiny_fixture):
    for arch in ARCHS:
        model = load_model(tiny_fixture(arch), "float32")
        names = model.linear_weight_names()
        assert names and set(names) <= set(model.weights)
        assert "model.embed_tokens.weight" not in names
        assert not any("kv_b_proj" in n or n.endswith("gate.weight") for n in names)


@needs_packing
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_tokens_identical_with_and_without_packing(arch, tiny_fixture, gsm8k_dir):
    path = tiny_fixture(arch)
    tok = load_tokenizer(path)
    prompts = [tok.encode(q) for q in gsm8k_questions(gsm8k_dir, 6)]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    outs, packed_counts = [], []
    for pack in (False, True):
        engine = Engine(load_model(path, "bfloat16"), tok,
                        EngineConfig(kv_cache_bytes=32 << 20, max_batch=4, attn_micro_batch=2, prepack=pack,
                                     experts_kernel="torch"))       # every expert GEMM through oneDNN
        packed_counts.append(sum(t.is_mkldnn for t in engine.model.weights.values()))
        outs.append([o.token_ids for o in engine.generate(prompts, params)])
    assert packed_counts[0] == 0 and packed_counts[1] == len(engine.model.linear_weight_names())
    assert outs[0] == outs[1]


def test_prepack_true_without_support_is_a_clear_error(tiny_fixture):
    path = tiny_fixture("mixtral")
    with pytest.raises(InputError, match="prepack=True"):
        Engine(load_model(path, "float32"), None, EngineConfig(kv_cache_bytes=8 << 20, prepack=True))


@needs_packing
def test_packed_model_cannot_be_streamed_by_a_second_engine(tiny_fixture):
    model = load_model(tiny_fixture("mixtral"), "bfloat16")
    Engine(model, None, EngineConfig(kv_cache_bytes=8 << 20))                 # packs model.weights
    with pytest.raises(InputError, match="packed for CPU GEMMs"):
        Engine(model, None, EngineConfig(kv_cache_bytes=8 << 20, streaming="staged"))
