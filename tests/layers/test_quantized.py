"""Quantized weights: the layouts against hand computations, quantized checkpoints against
transformers running the same dequantized weights, their errors, streaming, the planner's bytes."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moegen.cli import main as cli_main
from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.engine.weight_stream import pin_weights
from moegen.errors import ConfigError, MissingTensorError, ShapeMismatchError, CheckpointError
from moegen.checkpoints.fixture import ARCHS, build_fixture
from moegen.checkpoints.quantize import dequantize_checkpoint, quantize_checkpoint
from moegen.bench.systems.measure import weights_bytes
from moegen.layers import quantized as qz
from moegen.layers.quantized import (Fp8BlockWeight, GptqWeight, concat_rows, dequantize, quantize_fp8,
                                     quantize_int, quantized_linear, stored_bytes)
from moegen.loader import MappedPages, TensorReader, dummy_model, load_model
from moegen.planner.cost_model import JobShape, predict
from moegen.planner.hardware import Hardware
from moegen.planner.model_spec import WEIGHT_FORMAT_BYTES, ModelSpec
from moegen.planner.plan import Plan
from tests.hf_reference import hf_greedy

NEW_TOKENS = 12
PROMPTS = [[1, 415, 2936, 9060, 285, 1142, 754, 28705], [1, 330, 1628], [1, 22557, 28725, 910, 460, 368, 28804, 13, 28737]]
TINY_GROUP = 16          # tiny fixtures are 32-128 features wide: groups of 128 would quantize nothing
SETTINGS = dict(max_batch=8, attn_micro_batch=8, max_prefill_tokens=4096)    # fixed: no planner, no probe


# ---- the layouts ------------------------------------------------------------------------------

def test_fp8_blocks_dequantize_as_data_times_their_block_scale():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))     # partial edge blocks
    q = quantize_fp8(w)
    assert q.data.dtype == torch.float8_e4m3fn and q.scales.shape == (3, 2) and q.scales.dtype == torch.float32
    data = q.data.float()
    want = torch.empty(300, 200)
    for i in range(300):
        for j in (0, 127, 128, 199):       # one float32 product per element, the block picked by hand
            want[i, j] = data[i, j] * q.scales[i // 128, j // 128]
    got = dequantize(q)
    cols = [0, 127, 128, 199]
    assert torch.equal(got[:, cols], want[:, cols])
    got = got.double()
    assert q.scales[2, 1] == w[256:, 128:].abs().max() / 448      # a partial corner block: its own amax
    # every element within half an e4m3 step (3 mantissa bits: 1/16 relative) of the original
    assert ((got - w.double()).abs() <= w.double().abs() / 16 + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_words_hold_the_codes_gptq_defines(bits, sym):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(bits)) * 0.02
    q = quantize_int(w, bits, group_size=32, sym=sym)
    p, mask = 32 // bits, (1 << bits) - 1
    assert q.qweight.shape == (96 // p, 64) and q.qzeros.shape == (3, 64 // p) and q.scales.shape == (3, 64)
    deq = dequantize(q).double()
    for n in (0, 5, 63):
        for k in (0, 7, 31, 32, 95):
            code = (int(q.qweight[k // p, n]) >> (bits * (k % p))) & mask
            zero = (((int(q.qzeros[k // 32, n // p]) >> (bits * (n % p))) & mask) + 1) & mask    # v1: zero - 1
            if sym:
                assert zero == 1 << (bits - 1)
            assert deq[n, k] == (code - zero) * float(q.scales[k // 32, n])
    step = q.scales.float().repeat_interleave(32, 0).t().double()
    # round to nearest: half a step, plus the float16 rounding of the scale (2^-11 relative) over
    # up to 2^(bits-1) steps; an asymmetric group's rounded zero can clip its top by one more half
    slack = (1 << (bits - 1)) / 2048 + 1e-3
    assert ((deq - w.double()).abs() <= step * ((0.5 if sym else 1.0) + slack)).all()


def test_chunked_quantized_linear_is_the_linear_of_the_dequantized_weight(monkeypatch):
    monkeypatch.setattr(qz, "DEQUANT_CHUNK_BYTES", 128 * 96 * 2)          # several chunks
    g = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(600, 96, generator=g), torch.randn(600, generator=g), torch.randn(5, 96, generator=g)
    for q in (quantize_fp8(w), quantize_int(w, 4, group_size=32), quantize_int(w, 8, group_size=32, sym=False)):
        assert q.chunk_rows(qz.DEQUANT_CHUNK_BYTES) < 600
        assert torch.equal(quantized_linear(x, q, b), F.linear(x, dequantize(q), b))
        got = quantized_linear(x.bfloat16(), q, b.bfloat16())
        assert torch.equal(got, F.linear(x.bfloat16(), dequantize(q, torch.bfloat16), b.bfloat16()))


def test_native_bf16_dequantization_equals_the_torch_path(monkeypatch):
    from moegen.ops.build import native_ops
    if native_ops() is None:
        pytest.skip("native kernels unavailable (MOEGEN_NATIVE=0 or no compiler)")
    g = torch.Generator().manual_seed(4)
    w = torch.randn(384, 320, generator=g)
    act_order = quantize_int(w, 4, group_size=64)
    act_order = GptqWeight(act_order.qweight, act_order.qzeros, act_order.scales,
                           act_order.g_idx[torch.randperm(320, generator=g)].contiguous(), 4)   # desc_act-like
    w352 = torch.randn(384, 352, generator=g)        # 88 words of 8 bits a column: 8 past the last 16
    # the vector paths (groups over whole runs of codes: one group per 16 words, or several) and the
    # scalar ones (act-order; groups of 8 codes; fp8 blocks of 40 columns: 16, 16 and a tail of 8)
    def regrouped(q, runs):       # groups that come back: A, B, A within one block of 16 words
        g_idx = torch.zeros_like(q.g_idx)
        g_idx[runs] = 5
        return GptqWeight(q.qweight, q.qzeros, q.scales, g_idx, q.bits)
    tiny_scales = quantize_fp8(w)
    tiny_scales.scales[1, 1] = 2.0 ** -135        # (rows 128-255, read below) every product subnormal
    for q in (quantize_fp8(w), quantize_fp8(w, (128, 40)), tiny_scales, quantize_int(w, 4, 64),
              quantize_int(w, 8, 64, sym=False), quantize_int(w, 8, 32), quantize_int(w352, 8, 32, sym=False),
              quantize_int(w, 8, 8), quantize_int(w352, 4, 32), regrouped(quantize_int(w, 8, 16), slice(16, 32)),
              regrouped(quantize_int(w, 4, 32), slice(32, 64)), act_order):
        k = q.shape[1]
        native = q.dequantize_rows(128, 384, torch.empty(256, k, dtype=torch.bfloat16))
        with monkeypatch.context() as m:
            m.setattr(qz, "_native_dequant", lambda w, out: None)
            plain = q.dequantize_rows(128, 384, torch.empty(256, k, dtype=torch.bfloat16))
        assert torch.equal(native, plain), (type(q).__name__, getattr(q, "bits", None), k)


def test_stacking_fp8_gate_and_up_narrower_than_a_block_keeps_each_ones_scale():
    g = torch.Generator().manual_seed(2)
    gate, up = quantize_fp8(torch.randn(40, 64, generator=g)), quantize_fp8(torch.randn(40, 64, generator=g) * 9)
    both = concat_rows([gate, up])
    assert both.block == (8, 128)                   # 40 rows is no whole block: re-expressed in 8-row blocks
    assert torch.equal(dequantize(both), torch.cat([dequantize(gate), dequantize(up)]))
    q4 = [quantize_int(torch.randn(40, 64, generator=g), 4, 32) for _ in range(2)]
    assert torch.equal(dequantize(concat_rows(q4)), torch.cat([dequantize(q) for q in q4]))


# ---- checkpoints against transformers --------------------------------------------------------

@pytest.fixture(scope="module")
def quantized_fixture(tmp_path_factory, tiny_fixture):
    """(arch, fmt) -> (quantized checkpoint, its dequantized float32 reference)."""
    built = {}

    def get(arch, fmt):
        if (arch, fmt) not in built:
            base = tmp_path_factory.mktemp(f"{arch}-{fmt}")
            if fmt == "fp8":
                ckpt = build_fixture(arch, "tiny", seed=0, out=base / "ckpt", quantize="fp8")
            else:
                ckpt, _ = quantize_checkpoint(tiny_fixture(arch), base / "ckpt", fmt, group_size=TINY_GROUP)
            built[arch, fmt] = ckpt, dequantize_checkpoint(ckpt, base / "reference")
        return built[arch, fmt]
    return get


def engine_tokens(path, **config):
    engine = Engine(load_model(path, "float32"), None, EngineConfig(kv_cache_bytes=16 << 20, **SETTINGS, **config))
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_greedy_tokens_match_transformers_on_the_dequantized_weights(arch, fmt, quantized_fixture):
    ckpt, reference = quantized_fixture(arch, fmt)
    model = load_model(ckpt, "float32")
    kinds = {type(w).__name__ for w in model.weights.values()}
    assert ("Fp8BlockWeight" if fmt == "fp8" else "GptqWeight") in kinds    # the GEMM weights stay quantized
    assert engine_tokens(ckpt) == [hf_greedy(reference, p, NEW_TOKENS) for p in PROMPTS]


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_transformers_own_fp8_loader_reads_our_fixture_as_we_do(arch, quantized_fixture):
    """transformers' FineGrainedFP8 integration (dequantizing on the CPU) loads the fixture: its
    names, dtypes, scale shapes and config are DeepSeek-V3's."""
    ckpt, _ = quantized_fixture(arch, "fp8")
    assert engine_tokens(ckpt) == [hf_greedy(ckpt, p, NEW_TOKENS) for p in PROMPTS]


def test_fp8_fixture_is_written_as_deepseek_v3_ships(quantized_fixture):
    ckpt, _ = quantized_fixture("deepseek_v3", "fp8")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    tensors = load_file(next(ckpt.glob("*.safetensors")))
    expert = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert tensors[expert].dtype == torch.float8_e4m3fn and tensors[expert + "_scale_inv"].shape == (1, 1)
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.input_layernorm.weight"):
        assert tensors[kept].dtype == torch.float32 and kept + "_scale_inv" not in tensors


def test_staged_streaming_moves_quantized_bytes_and_gives_the_same_tokens(quantized_fixture):
    ckpt, _ = quantized_fixture("qwen2_moe", "int4")
    engine = Engine(load_model(ckpt, "float32"), None, EngineConfig(kv_cache_bytes=16 << 20, streaming="staged",
                                                                    num_buffers=3, **SETTINGS))
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outs] == engine_tokens(ckpt)
    expert = engine.streamer.groups[engine.model.layers[0].ffn.expert_key(0)]
    moved = sum(stored_bytes(w) for w in expert.values())
    assert moved < sum(w.shape[0] * w.shape[1] for w in expert.values())      # under a byte per weight


def test_unquantized_modules_listed_as_skipped_stay_as_stored(tiny_fixture, tmp_path):
    skip = "model.layers.0.self_attn.q_proj"
    ckpt, _ = quantize_checkpoint(tiny_fixture("mixtral"), tmp_path / "q", "fp8", skip=[skip])
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["modules_to_not_convert"] == [skip]
    model = load_model(ckpt, "float32")
    assert isinstance(model.weights[f"{skip}.weight"], torch.Tensor)
    assert isinstance(model.weights["model.layers.0.self_attn.k_proj.weight"], Fp8BlockWeight)


def test_quantize_cli_writes_a_loadable_gptq_checkpoint(tiny_fixture, tmp_path, capsys):
    out = tmp_path / "int8"
    assert cli_main(["quantize", "--bits", "8", "--group-size", str(TINY_GROUP), str(tiny_fixture("olmoe")),
                     str(out)]) == 0
    assert "int8" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"]) == ("gptq", 8, TINY_GROUP)
    assert isinstance(load_model(out).weights["model.layers.0.mlp.experts.0.gate_up"], GptqWeight)


# ---- errors ---------------------------------------------------------------------------------

@pytest.fixture
def fp8_copy(quantized_fixture, tmp_path):
    ckpt, _ = quantized_fixture("mixtral", "fp8")
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def edit_tensors(ckpt, edit):
    f = next(ckpt.glob("*.safetensors"))
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def edit_config(ckpt, edit):
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))


SCALE = "model.layers.0.block_sparse_moe.experts.1.w2.weight_scale_inv"


def test_missing_scale_tensor_is_named(fp8_copy):
    edit_tensors(fp8_copy, lambda t: t.pop(SCALE))
    with pytest.raises(MissingTensorError, match=SCALE.replace(".", r"\.")):
        load_model(fp8_copy)


def test_bad_scale_shape_is_named(fp8_copy):
    edit_tensors(fp8_copy, lambda t: t.update({SCALE: torch.ones(2, 1)}))
    with pytest.raises(ShapeMismatchError, match=r"w2\.weight_scale_inv .*\(2, 1\).*needs float32 \(1, 1\)"):
        load_model(fp8_copy)


def test_unknown_quant_method_is_refused(fp8_copy):
    edit_config(fp8_copy, lambda c: c["quantization_config"].update(quant_method="awq"))
    with pytest.raises(ConfigError, match="quant_method 'awq' is not supported; supported: fp8, gptq"):
        load_model(fp8_copy)


def test_static_activation_scales_are_refused(fp8_copy):
    edit_config(fp8_copy, lambda c: c["quantization_config"].update(activation_scheme="static"))
    with pytest.raises(ConfigError, match="activation_scheme='static' is not supported"):
        load_model(fp8_copy)


def test_fp8_tensors_without_a_quantization_config_are_refused(fp8_copy):
    edit_config(fp8_copy, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="float8_e4m3fn but config.json has no fp8 quantization_config"):
        load_model(fp8_copy)


def test_gptq_bits_and_shapes_are_checked(quantized_fixture, tmp_path):
    ckpt, _ = quantized_fixture("mixtral", "int4")
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    edit_config(dst, lambda c: c["quantization_config"].update(bits=3))
    with pytest.raises(ConfigError, match="bits=3: moegen reads 4- and 8-bit GPTQ weights"):
        load_model(dst)
    edit_config(dst, lambda c: c["quantization_config"].update(bits=4))
    name = "model.layers.1.self_attn.o_proj.scales"
    edit_tensors(dst, lambda t: t.update({name: t[name][:1].clone()}))
    with pytest.raises(ShapeMismatchError, match=r"o_proj\.scales has shape \(1, 64\).*needs \(4, 64\)"):
        load_model(dst)


# ---- memory: pinning once, releasing mapped pages, dummy quantized models, the planner --------

def test_pin_weights_moves_each_weight_into_slabs_in_place():
    g = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(100, 30, generator=g), "q": quantize_int(torch.randn(64, 64, generator=g), 4, 32),
               "b": torch.randn(7, generator=g)}
    before = {n: dequantize(w).clone() for n, w in weights.items()}
    slabs, released = [], []

    def alloc(n):
        slabs.append(torch.zeros(n, dtype=torch.uint8))
        return slabs[-1]
    sizes = pin_weights(weights, release=released.append, slab_bytes=16 << 10, alloc=alloc)
    assert all(s & (s - 1) == 0 for s in sizes) and sum(sizes) < 2 * sum(stored_bytes(w) for w in weights.values())
    for n, w in weights.items():
        assert torch.equal(dequantize(w), before[n])
        assert all(any(t.data_ptr() >= s.data_ptr() and t.data_ptr() < s.data_ptr() + s.numel() for s in slabs)
                   for t in qz.tensors_of(w))
    assert len(released) == 2 + 4                       # every source tensor, once


def test_released_checkpoint_pages_still_read_the_same(tmp_path):
    t = torch.randn(512, 1024).bfloat16()
    save_file({"w": t}, str(tmp_path / "w.safetensors"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        mapped = f.get_tensor("w")
        release = MappedPages()
        release(mapped)
        assert torch.equal(mapped, t)                 # faulted back in from the file
        anonymous = t.clone()
        release(anonymous)                            # never touches anonymous memory
        assert torch.equal(anonymous, t)


def test_loader_hands_back_the_pages_of_tensors_it_copied(tmp_path):
    a, b = torch.randn(256, 1024).bfloat16(), torch.randn(256, 1024).bfloat16()
    f = tmp_path / "m.safetensors"
    save_file({"a": a, "b": b}, str(f))
    reader = TensorReader({"a": f, "b": f})
    kept = reader.get("a")                                # used as stored: stays mapped
    reader.release_copied(kept)
    assert reader.pages.released_bytes == 0
    stacked = torch.cat([reader.get("a"), reader.get("b")])   # an expert's gate and up: a copy
    reader.release_copied(stacked)
    assert reader.pages.released_bytes >= a.numel() * 2 * 2 - 4 * 4096
    assert torch.equal(kept, a) and torch.equal(stacked, torch.cat([a, b]))   # faulted back from the file


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_dummy_quantized_model_is_made_quantized_and_counted_by_the_planner(fmt):
    config = {"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
              "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 512, "max_position_embeddings": 512}
    model = dummy_model(config, "bfloat16", quantize=fmt)
    experts = [w for n, w in model.weights.items() if ".experts." in n]
    assert experts and all(isinstance(w, GptqWeight) and w.bits == int(fmt[3:]) for w in experts)
    spec = ModelSpec.from_model(model)
    assert spec.weight_format == fmt
    # the planner leaves out g_idx (4 bytes per input feature of a matrix: 1-3% at these widths)
    assert weights_bytes(model.weights) == pytest.approx(spec.weight_bytes(2)["total"], rel=0.05)
    assert spec.expert_bytes(2) == int(spec.expert_params() * WEIGHT_FORMAT_BYTES[fmt])
    engine = Engine(model, None, EngineConfig(kv_cache_bytes=4 << 20, **SETTINGS))
    outs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert all(len(o.token_ids) == 3 for o in outs)


@pytest.mark.parametrize("bits", [8, 4])
def test_dummy_gptq_weights_are_centred(bits):
    """Random codes over one zero point lean half a code one way (int4: 11% of the std), which
    collapsed a 24-layer dummy model onto one token; alternating zeros cancel it."""
    from moegen.loader import random_gptq
    q = random_gptq((1024, 2048), bits, 0.02, torch.Generator().manual_seed(0))
    w = dequantize(q)
    assert w.std().item() == pytest.approx(0.02, rel=0.05)
    # one zero everywhere shifts the mean by half a code (0.5 * scale); noise here is ~0.05 * scale
    assert abs(w.mean().item()) < 0.25 * q.scales.float().mean().item()
    assert w.sum(dim=1).abs().mean().item() < 3 * 0.02 * 2048 ** 0.5   # rows sum like zero-mean noise


# the bench Mixtral's shapes, two layers: what the planner tests price
BENCH_MIXTRAL = {"model_type": "mixtral", "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 2,
                 "num_attention_heads": 16, "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2,
                 "vocab_size": 32000}


def test_cost_model_charges_dequantization_only_for_quantized_weights():
    plain = ModelSpec.from_config(BENCH_MIXTRAL)
    int4 = ModelSpec.from_config({**BENCH_MIXTRAL, "quantization_config": {"quant_method": "gptq", "bits": 4,
                                                                     "group_size": 128}})
    hw = Hardware(gemm_flops_per_s=1e11, host_mem_bw_gbps=20, cpu_attention_gbps=10,
                  dequant_params_per_s={"int4": 1e9})
    plan = Plan(device="cpu", max_batch=16, attn_micro_batch=16, max_prefill_tokens=2048, expert_chunk=0)
    job = JobShape(64, 8, 16)
    a, b = predict(plain, hw, plan, job), predict(int4, hw, plan, job)
    assert a.terms_s["decode"]["dequant"] == 0 < b.terms_s["decode"]["dequant"]
    assert b.terms_s["decode"]["memory"] < a.terms_s["decode"]["memory"]      # a quarter of the bytes read
    # one decode step dequantizes each expert with tokens once: 16 tokens x top-2 reach ~all 8
    per_expert_s = int4.expert_params() / 1e9
    assert b.terms_s["decode"]["dequant"] > 7 * 2 * per_expert_s * (job.gen_len - 1)


# ---- GPTQ checkpoints written by AutoGPTQ's own packing code --------------------------------

AUTOGPTQ_ENV = "MOEGEN_AUTOGPTQ_DIR"


def autogptq_quant_linear():
    """AutoGPTQ's QuantLinear (its pure-torch module: packing, and dequantizing on the CPU), loaded
    from its file so that the package's CUDA-era imports are not needed. Found where
    MOEGEN_AUTOGPTQ_DIR points (`pip install --no-deps --target DIR auto-gptq==0.7.1`: not into
    the venv, whose `tests` package the wheel's own top-level `tests` would shadow), else installed."""
    import importlib.util
    if os.environ.get(AUTOGPTQ_ENV):
        package = Path(os.environ[AUTOGPTQ_ENV]) / "auto_gptq"
    else:
        spec = importlib.util.find_spec("auto_gptq")
        package = Path(spec.submodule_search_locations[0]) if spec is not None else None
    if package is None or not package.is_dir():
        pytest.skip(f"AutoGPTQ not found: `pip install --no-deps --target DIR auto-gptq==0.7.1` and set {AUTOGPTQ_ENV}=DIR")
    path = package / "nn_modules" / "qlinear" / "qlinear_cuda_old.py"
    module_spec = importlib.util.spec_from_file_location("autogptq_qlinear_cuda_old", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.QuantLinear


def autogptq_pack(QuantLinear, w: torch.Tensor, bits: int, group: int) -> dict:
    """AutoGPTQ's buffers for weight w [N, K] (float16), from round-to-nearest asymmetric groups:
    as in GPTQ's own flow, its pack() gets the grid's scales and zeros and the weight on the grid."""
    n, k = w.shape
    mine = quantize_int(w.float(), bits, group, sym=False)        # the grid: scales, zeros
    maxq = (1 << bits) - 1
    zeros = (((mine._unpack(mine.qzeros).flatten(1)[:, :n] + 1) & maxq)).t().contiguous()   # [N, G]
    linear = torch.nn.Linear(k, n, bias=False).half()
    linear.weight.data = dequantize(mine).half()
    layer = QuantLinear(bits, group, k, n, bias=False)
    layer.pack(linear, mine.scales.t().contiguous(), zeros, torch.arange(k) // group)
    return {name: getattr(layer, name) for name in ("qweight", "qzeros", "scales", "g_idx")}, layer


@pytest.mark.parametrize("bits", [4, 8])
def test_autogptq_packed_weights_dequantize_as_autogptq_computes_them(bits):
    QuantLinear = autogptq_quant_linear()
    w = (torch.randn(192, 256, generator=torch.Generator().manual_seed(bits)) * 0.02).half()
    parts, layer = autogptq_pack(QuantLinear, w, bits, 64)
    ours = GptqWeight(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], bits)
    theirs = layer(torch.eye(256, dtype=torch.float16)).t()            # AutoGPTQ's own CPU dequantization
    assert torch.equal(dequantize(ours).half(), theirs)
    step = parts["scales"].float().repeat_interleave(64, 0).t()
    assert ((dequantize(ours) - w.float()).abs() <= 1.01 * step).all()     # and it is w, quantized


def test_a_gptq_checkpoint_packed_by_autogptq_matches_transformers(tiny_fixture, tmp_path):
    QuantLinear = autogptq_quant_linear()
    src = tiny_fixture("qwen3_moe")
    dst = tmp_path / "autogptq"
    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    tensors = load_file(f)
    for name in [n for n, t in tensors.items() if n.endswith("_proj.weight") and t.dim() == 2]:
        parts, _ = autogptq_pack(QuantLinear, tensors.pop(name), 4, TINY_GROUP)
        tensors.update({f"{name.removesuffix('.weight')}.{p}": t.contiguous() for p, t in parts.items()})
    save_file(tensors, f, metadata={"format": "pt"})
    edit_config(dst, lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4,
                                                            "group_size": TINY_GROUP, "desc_act": False, "sym": False}))
    reference = dequantize_checkpoint(dst, tmp_path / "reference")
    assert engine_tokens(dst) == [hf_greedy(reference, p, NEW_TOKENS) for p in PROMPTS]


def test_cost_model_charges_quantized_experts_on_the_fused_kernel_its_rate_plus_dequantization():
    """Where the fused experts kernel runs (its rate measured), quantized experts go through it too:
    the same compute as bf16 at the kernel's rate, fewer bytes, plus each expert's dequantization."""
    plain = ModelSpec.from_config(BENCH_MIXTRAL)
    int8 = ModelSpec.from_config({**BENCH_MIXTRAL, "quantization_config": {"quant_method": "gptq", "bits": 8,
                                                                     "group_size": 128}})
    fused_rate = 5e11
    hw = Hardware(gemm_flops_per_s=1e11, host_mem_bw_gbps=20, cpu_attention_gbps=10,
                  dequant_params_per_s={"int8": 1e10},
                  fused_experts_shapes={"bfloat16": ((4, 1024, 3584, fused_rate), (512, 1024, 3584, fused_rate))})
    plan = Plan(device="cpu", max_batch=16, attn_micro_batch=16, max_prefill_tokens=2048, expert_chunk=0)
    job = JobShape(64, 8, 16)
    a, b = predict(plain, hw, plan, job), predict(int8, hw, plan, job)
    assert b.terms_s["decode"]["dequant"] > 0 == a.terms_s["decode"]["dequant"]
    assert b.terms_s["decode"]["compute"] == pytest.approx(a.terms_s["decode"]["compute"])
    unfused = predict(int8, Hardware(gemm_flops_per_s=1e11, host_mem_bw_gbps=20, cpu_attention_gbps=10,
                                     dequant_params_per_s={"int8": 1e10}), plan, job)
    assert b.terms_s["decode"]["compute"] < unfused.terms_s["decode"]["compute"]     # the kernel's rate, not 1e11
    # with the kernel measured on int8 experts (the probe does), that rate, dequantization inside it
    measured = Hardware(gemm_flops_per_s=1e11, host_mem_bw_gbps=20, cpu_attention_gbps=10,
                        dequant_params_per_s={"int8": 1e10},
                        fused_experts_shapes={**hw.fused_experts_shapes,
                                              "int8": ((4, 1024, 3584, fused_rate / 2), (512, 1024, 3584, fused_rate / 2))})
    big = Plan(device="cpu", max_batch=512, attn_micro_batch=512, max_prefill_tokens=2048, expert_chunk=0)
    wide = JobShape(64, 8, 512)         # 128 rows an expert in decode: compute-bound
    b, c = predict(int8, hw, big, wide), predict(int8, measured, big, wide)
    assert c.terms_s["decode"]["dequant"] < b.terms_s["decode"]["dequant"]     # only the dense projections' left
    assert c.terms_s["decode"]["compute"] > 1.1 * b.terms_s["decode"]["compute"]     # experts at the int8 curve's half rate


def test_probe_rows_of_the_fused_kernel_become_a_curve_per_format():
    from moegen.planner.rates import FUSED_QUANTIZED_SHAPES
    assert FUSED_QUANTIZED_SHAPES[False]
    rows = [{"format": fmt, "rows_per_expert": r, "hidden": 1024, "intermediate": 512, "flops_per_s": rate}
            for fmt, rate in (("bfloat16", 1e12), ("fp8", 6e11)) for r in (64, 256)]
    hw = Hardware.from_probe({"device": "cpu", "gemm_best_flops_per_s": {"bfloat16": 1e12}, "host_mem_bw_gbps": 20,
                              "cpu_attention": {"kv_gbps": 10}, "fused_experts": {"isa": "amx", "shapes": rows}})
    assert set(hw.fused_experts_shapes) == {"bfloat16", "fp8"}
    assert hw.fused_experts_rate("fp8", 64, 1024, 512) == pytest.approx(6e11)
