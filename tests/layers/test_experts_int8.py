"""experts_kernel=int8 (csrc/experts_int8.cpp via moegen.ops.experts): the lossy int8 experts
kernel against a PyTorch statement of the same arithmetic, against the exact path within the
stated loss, on every ISA it has here, and inside the engine."""
import pytest
import torch
import torch.nn.functional as F

from moegen import Engine, SamplingParams
from moegen.checkpoints.quantize import quantize_checkpoint
from moegen.errors import ConfigError, InputError
from moegen.layers.moe import Dispatch
from moegen.loader import load_model
from moegen.ops import cpu
from moegen.ops import experts as fused
from moegen.ops.build import native_ops
from tests.engine.test_disk_tier import SMALL, disk_budget
from tests.layers.test_fused_experts import ARCHS, KERNEL_CASES, random_layer, reference, routing

needs_native = pytest.mark.skipif(native_ops() is None, reason="moegen's native kernels did not build on this machine")
INT8_ISAS = fused.available_int8_isas()


def quantize_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 (the kernel's activations): codes as float, scales."""
    amax = v.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(v / scale[:, None]).clamp(-127, 127), scale


def int8_reference(x, d: Dispatch, gate_ups, downs):
    """The int8 kernel's arithmetic in PyTorch: weights per output column and activation rows per
    row quantized to int8, integer dot products (exact in float64), silu(gate) * up in float32, the
    down output rounded to bf16, times the router weight rounded again, summed per token in
    ascending expert order (rounded after each add, as Dispatch.combine)."""
    inter, hidden = downs[0].shape[1], downs[0].shape[0]
    weighted = torch.empty(len(d.token_idx), hidden, dtype=torch.bfloat16)
    row = 0
    for e, n in enumerate(d.counts):
        if not n:
            continue
        rows = slice(row, row + n)
        qg, sg = fused.quantize_columns(gate_ups[e])
        qd, sd = fused.quantize_columns(downs[e])
        xq, xs = quantize_rows(x[d.token_idx[rows]].float())
        a = (xq.double() @ qg.double().T).float() * sg * xs[:, None]
        h = F.silu(a[:, :inter]) * a[:, inter:]
        hq, hs = quantize_rows(h)
        y = ((hq.double() @ qd.double().T).float() * sd * hs[:, None]).bfloat16()
        weighted[rows] = (y.float() * d.weights[rows, None]).bfloat16()
        row += n
    return d.combine(weighted)


def run(isa, monkeypatch, x, d, gate_ups, downs):
    monkeypatch.setenv("MOEGEN_EXPERTS_INT8_ISA", isa)
    inter = downs[0].shape[1]
    gate_up, down = fused.pack_layer_int8(lambda e: (gate_ups[e], downs[e]), len(downs), downs[0].shape[0], inter)
    return fused.moe_experts_int8(x, d.token_idx, d.weights, d.counts, gate_up, down, inter, d.top_k)


@needs_native
@pytest.mark.parametrize("isa", INT8_ISAS)
@pytest.mark.parametrize("hidden,inter,experts,k,tokens,only", KERNEL_CASES + [
    (64, 64, 4, 2, 37, None),            # the int8 tiles' multiples (64); a few rows per expert
    (128, 1100, 2, 1, 300, None),        # wide experts, not a multiple of 64
    (64, 4096, 2, 1, 400, None),         # ~200 rows an expert, h over 1 MiB: row chunks of 64
])
def test_kernel_matches_the_int8_reference_and_stays_near_the_exact_path(monkeypatch, isa, hidden, inter, experts,
                                                                           k, tokens, only):
    """The kernel computes what int8_reference states: the same codes, so results differ only where
    float32 rounding in another order moves an activation across a rounding boundary (a code step
    at most, ~1/127 of a row's largest value) -- and it stays within the stated loss of the exact
    path (the bf16 per-expert layer): 5% of the output's norm on these random weights."""
    gate_ups, downs = random_layer(hidden, inter, experts)
    d = routing(tokens, experts, k, only=only)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).bfloat16()
    ours = run(isa, monkeypatch, x, d, gate_ups, downs)
    ref = int8_reference(x, d, gate_ups, downs)
    assert ours.shape == (tokens, hidden) and ours.dtype == torch.bfloat16
    if not tokens:
        return
    diff = (ours.float() - ref.float()).abs()
    assert diff.max() <= 0.02 * ref.float().abs().max()
    assert (diff > 0.002 * ref.float().abs().max()).float().mean() <= 0.02
    exact = reference(x, d, gate_ups, downs).float()
    assert (ours.float() - exact).norm() <= 0.05 * exact.norm()


@needs_native
def test_isas_agree_bit_for_bit(monkeypatch):
    """The AMX, VNNI and portable micro-kernels do the same integer arithmetic and share every float
    step: identical outputs. A CPU that lists AMX-INT8 runs the tiles first, else one that lists
    AVX-512 VNNI (with BW and VL) the VNNI path (the tiles on any CPU: tests/layers/test_amx_emulated.py)."""
    if "amx-int8" in INT8_ISAS:
        assert INT8_ISAS[0] == "amx-int8" and {"amx_tile", "amx_int8"} <= cpu.flags()
    if {"avx512_vnni", "avx512bw", "avx512vl"} <= cpu.flags():
        assert [isa for isa in INT8_ISAS if isa != "amx-int8"][0] == "avx512-vnni"
    if len(INT8_ISAS) < 2:
        pytest.skip(f"one int8 ISA on this CPU/build ({INT8_ISAS}): nothing to compare")
    gate_ups, downs = random_layer(200, 150, 6, seed=3)
    d = routing(300, 6, 2, seed=4)
    x = torch.randn(300, 200, generator=torch.Generator().manual_seed(5)).bfloat16()
    outs = [run(isa, monkeypatch, x, d, gate_ups, downs) for isa in INT8_ISAS]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_pack_int8_layout():
    """codes[nb, kb, g, n, j] is column 16 nb + n's input 64 kb + 4 g + j; padding is zero; the
    offset is 128 times the column's code sum; scales dequantize the codes to within half a step."""
    w = torch.randn(40, 100).bfloat16()
    codes, scales, offsets = fused.pack_int8(w)
    assert codes.shape == (4, 2, 16, 16, 4) and codes.dtype == torch.int8
    q, s = fused.quantize_columns(w)
    flat = codes.permute(0, 3, 1, 2, 4).reshape(64, 128)
    assert torch.equal(flat[:40, :100], q) and not flat[40:].any() and not flat[:, 100:].any()
    assert torch.equal(offsets[:40], 128 * q.sum(dim=1, dtype=torch.int32)) and not offsets[40:].any()
    assert torch.equal(scales[:40], s) and not scales[40:].any()
    assert ((q.float() * s[:, None] - w.float()).abs() <= s[:, None] / 2 + 1e-6).all()
    assert q.abs().amax(dim=1).eq(127).all()                        # each column uses its whole range


@needs_native
def test_unknown_int8_isa_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MOEGEN_EXPERTS_INT8_ISA", "avx10-int8")
    with pytest.raises(ConfigError, match="not available; expected one of"):
        fused.int8_isa()


@needs_native
def test_unavailable_int8_isa_is_a_clear_error(monkeypatch):
    missing = [isa for isa in fused.INT8_ISA_CODES if isa not in INT8_ISAS]
    if not missing:
        pytest.skip("every int8 ISA runs on this CPU/build: none to refuse")
    monkeypatch.setenv("MOEGEN_EXPERTS_INT8_ISA", missing[0])
    with pytest.raises(ConfigError, match="not available on this CPU/build"):
        fused.int8_isa()


@needs_native
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_runs_int8_experts_near_the_exact_engine(tiny_fixture, arch):
    """experts_kernel=int8 packs every MoE layer's experts (no plain expert weight kept) and its
    logits stay near the exact engine's: within 10% of the logit scale on the tiny random
    fixtures (the loss of four int8 roundings per expert, routing near-ties aside)."""
    path = tiny_fixture(arch)
    seq = [1, 100, 200, 300, 400, 500, 17, 9]
    exact = load_model(path, "bfloat16").forward([seq])[0].float()
    engine = Engine.from_pretrained(path, dtype="bfloat16", kv_cache_memory=8 << 20, experts_kernel="int8")
    weights = engine.model.weights
    assert any(name.endswith(fused.INT8_GATE_UP) for name in weights)
    assert not any(".experts." in name or name.endswith(fused.GATE_UP) for name in weights)
    ours = engine.model.forward([seq])[0].float()
    assert (ours - exact).abs().max() <= 0.1 * exact.abs().max()
    out = engine.generate([seq, [5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert [len(c.token_ids) for c in out] == [4, 4]


@needs_native
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantized_checkpoints_are_requantized_from_their_dequantized_weights(tmp_path, tiny_fixture, fmt):
    """A quantized checkpoint's experts go to int8 from the bf16 weights the exact path computes
    with: its int8 engine stays as near its exact engine as a bf16 model's does."""
    path = quantize_checkpoint(tiny_fixture("qwen3_moe"), tmp_path / "ckpt", fmt, group_size=32)[0]
    seq = [1, 100, 200, 300, 400, 500, 17, 9]
    exact = Engine.from_pretrained(path, dtype="bfloat16", kv_cache_memory=8 << 20, experts_kernel="fused")
    ours = Engine.from_pretrained(path, dtype="bfloat16", kv_cache_memory=8 << 20, experts_kernel="int8")
    assert any(name.endswith(fused.INT8_GATE_UP) for name in ours.model.weights)
    want, got = exact.model.forward([seq])[0].float(), ours.model.forward([seq])[0].float()
    assert (got - want).abs().max() <= 0.1 * want.abs().max()


@needs_native
def test_int8_where_it_cannot_run_or_over_another_packing_is_a_clear_error(tiny_fixture):
    from moegen.engine.config import EngineConfig
    with pytest.raises(InputError, match="experts_kernel=int8"):
        Engine.from_pretrained(tiny_fixture("mixtral"), dtype="float32", kv_cache_memory=8 << 20,
                               experts_kernel="int8")
    model = load_model(tiny_fixture("mixtral"), "bfloat16")
    Engine(model, None, EngineConfig(kv_cache_bytes=8 << 20, experts_kernel="int8", prepack=False))
    for other in ("torch", "fused"):
        with pytest.raises(InputError, match="packed for the int8 experts kernel"):
            Engine(model, None, EngineConfig(kv_cache_bytes=8 << 20, experts_kernel=other, prepack=False))
    with pytest.raises(InputError, match="experts_kernel=int8 runs the experts on the CPU"):
        Engine.from_pretrained(tiny_fixture("mixtral"), dtype="bfloat16", kv_cache_memory=8 << 20,
                               experts_kernel="int8", streaming="staged")
    path = tiny_fixture("mixtral")
    budget = disk_budget(path, "bfloat16", resident_share=0.1, experts_kernel="int8")
    with pytest.raises(InputError, match="experts_kernel=int8 with the disk tier"):
        Engine.from_pretrained(path, dtype="bfloat16", host_memory=budget, experts_kernel="int8", **SMALL)
