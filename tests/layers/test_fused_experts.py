"""The fused routed-experts kernel (csrc/experts.cpp via moegen.ops.experts) against the per-expert
PyTorch path, on every ISA this CPU runs, and inside the model for every architecture."""
import pytest
import torch

from moegen import Engine, SamplingParams
from moegen.errors import ConfigError, InputError
from moegen.checkpoints.quantize import quantize_checkpoint
from moegen.layers.moe import PACKED_PARTS, Dispatch, SparseMoE
from moegen.layers.quantized import dequantize, fits_tiles, quantize_fp8, quantize_int, stored_bytes, tile_codes
from moegen.loader import load_model
from moegen.ops import cpu
from moegen.ops import experts as fused
from moegen.ops.build import native_ops
from tests.hf_reference import hf_logits

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
ISAS = fused.available_isas()
needs_native = pytest.mark.skipif(not ISAS, reason="moegen's native kernels did not build on this machine")


def reference(x, d: Dispatch, gate_ups, downs):
    """moe.py's per-expert path (SparseMoE.run_experts over plain weights): each expert's SwiGLU
    over its rows times the router weight, summed per token."""
    return per_expert_layer(gate_ups, downs).run_experts(expert_weights(gate_ups, downs), x, d)


def per_expert_layer(gate_ups, downs) -> SparseMoE:
    return SparseMoE("layer", downs[0].shape[0], downs[0].shape[1], len(downs), router=None)


def expert_weights(gate_ups, downs) -> dict:
    moe = per_expert_layer(gate_ups, downs)
    return {name: t for e, (gu, dn) in enumerate(zip(gate_ups, downs))
            for name, t in ((f"{moe.expert_key(e)}.gate_up", gu), (f"{moe.expert_key(e)}.down", dn))}


def random_layer(hidden, inter, experts, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_ups = [(torch.randn(2 * inter, hidden, generator=g) * 0.05).bfloat16() for _ in range(experts)]
    downs = [(torch.randn(hidden, inter, generator=g) * 0.05).bfloat16() for _ in range(experts)]
    return gate_ups, downs


def routing(tokens, experts, k, seed=0, only=None):
    """Random top-k routing; `only` restricts it to those experts (the others get no token)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(only if only is not None else range(experts))
    top_i = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(tokens)]) \
        if tokens else torch.zeros(0, k, dtype=torch.long)
    return Dispatch.from_routing(top_i, torch.rand(tokens, k, generator=g), experts)


def assert_bf16_close(ours, ref):
    """Only fp32 summation order inside the GEMMs differs: a bf16 rounding step at most flips."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    if not ref.numel():
        return
    diff = (ours.float() - ref.float()).abs()
    assert diff.max() <= 0.01 * ref.float().abs().max()
    assert (diff > 0).float().mean() <= 0.02


# (hidden, inter, experts, k, tokens, only): the routings an experts kernel is checked over (the
# int8 kernel's tests add their own tile multiples)
KERNEL_CASES = [
    (64, 32, 4, 2, 37, None),            # tile multiples; a few rows per expert
    (100, 70, 5, 2, 23, None),           # neither a multiple of 16 nor of 32: padded tiles
    (96, 48, 8, 2, 1, None),             # one token: one row on two experts, the others empty
    (64, 32, 8, 2, 40, [1, 6]),          # experts with zero tokens among busy ones
    (128, 64, 4, 2, 3000, None),         # thousands of rows per expert
    (64, 32, 4, 2, 0, None),             # no tokens at all
    (64, 32, 8, 1, 30, None),            # top-1
    (64, 32, 16, 8, 50, None),           # fine-grained: top-8 of 16
]


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hidden,inter,experts,k,tokens,only", KERNEL_CASES)
def test_kernel_matches_per_expert_path(monkeypatch, isa, hidden, inter, experts, k, tokens, only):
    monkeypatch.setenv("MOEGEN_EXPERTS_ISA", isa)
    gate_ups, downs = random_layer(hidden, inter, experts)
    d = routing(tokens, experts, k, only=only)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).bfloat16()
    gate_up, down = fused.pack_layer(gate_ups, downs, inter)
    ours = fused.moe_experts(x, d.token_idx, d.weights, d.counts, gate_up, down, inter, k)
    assert_bf16_close(ours, reference(x, d, gate_ups, downs))
    if only is not None:
        assert [e for e, n in enumerate(d.counts) if n] == only


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hidden,inter,experts,k,tokens", [
    (64, 32, 6, 2, 45),           # a few rows per expert
    (64, 4096, 2, 1, 600),        # ~300 rows of a wide expert: its h (8 KiB a row) split into items
])
def test_split_by_experts_and_by_columns_agree(monkeypatch, isa, hidden, inter, experts, k, tokens):
    """With enough busy experts for the threads, each thread runs whole experts (rows split so
    its h fits its L2); with more threads, every thread works on every expert by output columns.
    Same arithmetic either way: bit for bit the same result, and the reference's."""
    monkeypatch.setenv("MOEGEN_EXPERTS_ISA", isa)
    gate_ups, downs = random_layer(hidden, inter, experts)
    d = routing(tokens, experts, k)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).bfloat16()
    gate_up, down = fused.pack_layer(gate_ups, downs, inter)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 64):               # 1 thread: by experts; 64 threads: more than the items, by columns
            torch.set_num_threads(n)
            outs.append(fused.moe_experts(x, d.token_idx, d.weights, d.counts, gate_up, down, inter, k))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert_bf16_close(outs[0], reference(x, d, gate_ups, downs))


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [0, 1, 3])
@pytest.mark.parametrize("hidden,inter,experts,k,tokens,only", [
    (64, 32, 8, 2, 40, [1, 6, 7]),      # idle experts between busy ones
    (70, 40, 6, 2, 300, None),          # shapes off the tile
])
def test_tiled_experts_in_groups_equal_the_layer_packed_kernel(monkeypatch, isa, group, hidden, inter, experts, k,
                                                               tokens, only):
    """Each expert packed on its own (the disk tier) and run `group` busy experts a call, rows then
    summed by Dispatch.combine: bit for bit the kernel over the layer packed whole, incl. the packer."""
    monkeypatch.setenv("MOEGEN_EXPERTS_ISA", isa)
    gate_ups, downs = random_layer(hidden, inter, experts)
    d = routing(tokens, experts, k, only=only)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).bfloat16()
    whole = fused.moe_experts(x, d.token_idx, d.weights, d.counts, *fused.pack_layer(gate_ups, downs, inter), inter, k)
    moe = per_expert_layer(gate_ups, downs)
    weights = {name: moe.tile_expert(name.rsplit(".", 1)[1], t) for name, t in expert_weights(gate_ups, downs).items()}
    assert torch.equal(weights[f"{moe.expert_key(0)}.down"], fused.pack_tiles(downs[0]))
    moe.tiled = True
    held = []

    class Held:                         # weights_for: counts the experts held at once
        def __init__(self, key):
            self.key = key

        def __enter__(self):
            held.append(self.key)
            return weights

        def __exit__(self, *exc):
            held.remove(self.key)

    peak = []
    real = fused.expert_rows
    monkeypatch.setattr(fused, "expert_rows", lambda *a: (peak.append(len(held)), real(*a))[1])
    assert torch.equal(moe.run_experts(weights, x, d, weights_for=Held, group=group), whole)
    busy = sum(1 for n in d.counts if n)
    assert max(peak) == min(group or busy, busy)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hidden", [256, 250])  # whole output lines; a partial last line
def test_outputs_written_past_the_caches_equal_those_written_through_them(monkeypatch, isa, hidden):
    """A layer whose weighted outputs exceed csrc/experts.cpp's kStreamOutBytes (16 MiB) has them
    written with non-temporal stores; the same tokens in chunks below it take ordinary stores. Each
    row's arithmetic is the same either way: bit for bit the same result, and the reference's."""
    monkeypatch.setenv("MOEGEN_EXPERTS_ISA", isa)
    experts, k, tokens, chunk = 4, 2, 15000, 3750
    row_bytes = 2 * ((hidden + 31) // 32 * 32 + 32)                # the kernel's padded output rows
    assert tokens * k * row_bytes > 16 << 20 > chunk * k * row_bytes
    gate_ups, downs = random_layer(hidden, 64, experts)
    gate_up, down = fused.pack_layer(gate_ups, downs, 64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    top_w, top_i = torch.rand(tokens, experts, generator=g).topk(k, dim=1)

    def run(lo, hi):
        d = Dispatch.from_routing(top_i[lo:hi], top_w[lo:hi], experts)
        return fused.moe_experts(x[lo:hi], d.token_idx, d.weights, d.counts, gate_up, down, 64, k)

    whole = run(0, tokens)
    assert torch.equal(whole, torch.cat([run(lo, lo + chunk) for lo in range(0, tokens, chunk)]))
    assert_bf16_close(whole, reference(x, Dispatch.from_routing(top_i, top_w, experts), gate_ups, downs))


def small_integer_layer(tokens):
    """Three experts (hidden 64, inter 32, top-2) of small integers, unit router weights and inputs
    in eighths: every product and sum exact in bf16 and fp32, so any summation order gives the
    reference's bits. Returns (gate_ups, downs, dispatch, x, packed gate_up, packed down)."""
    gate_ups = [torch.randint(-2, 3, (64, 64)).bfloat16() for _ in range(3)]
    downs = [torch.randint(-2, 3, (64, 32)).bfloat16() for _ in range(3)]
    d = routing(tokens, 3, 2)
    d.weights = torch.ones_like(d.weights)
    x = torch.randint(-2, 3, (tokens, 64)).bfloat16() / 8
    return (gate_ups, downs, d, x, *fused.pack_layer(gate_ups, downs, 32))


@needs_native
def test_isas_agree_with_each_other(monkeypatch):
    """Every ISA reads the same packed tiles; on small integers all sums are exact, so they agree
    bit for bit with each other and with the reference."""
    gate_ups, downs, d, x, gate_up, down = small_integer_layer(20)
    outs = []
    for isa in ISAS:
        monkeypatch.setenv("MOEGEN_EXPERTS_ISA", isa)
        outs.append(fused.moe_experts(x, d.token_idx, d.weights, d.counts, gate_up, down, 32, 2))
    ref = reference(x, d, gate_ups, downs)
    for out in outs:
        assert torch.equal(out, ref)


QUANTIZERS = {
    "fp8": quantize_fp8,                                              # 128 x 128 blocks
    "int8": lambda w: quantize_int(w, 8, group_size=32),
    "int4": lambda w: quantize_int(w, 4, group_size=32, sym=False),   # asymmetric: zero points vary
}


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", list(QUANTIZERS))
@pytest.mark.parametrize("hidden,inter,experts,k,tokens", [
    (128, 64, 4, 2, 37),
    (256, 96, 8, 2, 700),                # ~175 rows an expert: tiles dequantized a step ahead
    (128, 64, 3, 2, 900),                # ~600 rows an expert (over one 256-row chunk): all up front
    (128, 64, 8, 2, 1),                  # one token
    (128, 4096, 2, 1, 600),              # ~300 rows of a wide expert, more than one item: by columns
])
def test_quantized_experts_match_the_path_over_their_dequantized_weights(monkeypatch, isa, fmt, hidden, inter,
                                                                        experts, k, tokens):
    """Each tile dequantized inside the kernel gives exactly moegen.layers.quantized's bf16 weights,
    so the result is the bf16 kernel's over those weights: within the same tolerance."""
    monkeypatch.setenv("MOEGEN_EXPERTS_ISA", isa)
    plain_gu, plain_dn = random_layer(hidden, inter, experts)
    gate_ups, downs = [QUANTIZERS[fmt](w) for w in plain_gu], [QUANTIZERS[fmt](w) for w in plain_dn]
    assert all(fits_tiles(w) for w in gate_ups + downs)
    d = routing(tokens, experts, k)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).bfloat16()
    gate_up, down = fused.pack_layer([tile_codes(w) for w in gate_ups], [tile_codes(w) for w in downs], inter)
    assert fused.packed_format(gate_up, experts, hidden, inter) == fmt
    packed_bytes = sum(t.nbytes for t in gate_up[:1] + down[:1])
    assert packed_bytes == 3 * experts * hidden * inter * {"fp8": 1, "int8": 1, "int4": 0.5}[fmt]
    ours = fused.moe_experts(x, d.token_idx, d.weights, d.counts, gate_up, down, inter, k)
    deq = lambda ws: [dequantize(w, torch.bfloat16) for w in ws]
    assert_bf16_close(ours, reference(x, d, deq(gate_ups), deq(downs)))


def check_dequant_tiles(ops, fmt):
    """Every code the format has (all finite e4m3 bytes: subnormals, both zeros), with scales and
    zero points per column and tile, dequantized by `ops` = pack_tiles(dequantize(w)), bit for bit,
    also with denormals-are-zero set by the caller (fp8 subnormals decode through float32 ones)."""
    g = torch.Generator().manual_seed(3)
    w = QUANTIZERS[fmt](torch.randn(48, 256, generator=g))
    if fmt == "fp8":       # every finite byte at least once per row, block scales of very different sizes
        finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
        codes = torch.cat([finite, finite[:2]]).repeat(48, 1).view(torch.float8_e4m3fn)
        w = type(w)(codes, torch.tensor([[0.5, 3e-3], [7.0, 1.0]]), (32, 128))
    assert fits_tiles(w)
    want = fused.pack_tiles(dequantize(w, torch.bfloat16)).view(-1, 512)
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        try:
            got = ops.dequant_tiles(fused.pack_codes(tile_codes(w)), fused.FORMAT_CODES[fmt])
        finally:
            torch.set_flush_denormal(False)
        assert torch.equal(got, want)


@needs_native
@pytest.mark.parametrize("fmt", list(QUANTIZERS))
def test_tiles_dequantize_to_exactly_the_bf16_weights_of_the_torch_path(fmt):
    """The build's own dequantization (AVX-512 BF16 where the CPU has it; test_ops_attention.py
    checks the portable one the same way)."""
    check_dequant_tiles(native_ops().ops, fmt)


def test_quantized_weights_that_cut_a_tile_stay_off_the_kernel():
    """Scales must be constant over each 32-input tile: fp8 blocks 32-aligned, GPTQ groups of 32 or
    more in order; groups of 16 or an act-order g_idx do not fit (the per-expert path runs them)."""
    w = torch.randn(64, 128)
    assert fits_tiles(quantize_fp8(w)) and fits_tiles(quantize_int(w, 8, group_size=32))
    assert not fits_tiles(quantize_fp8(w, block=(128, 16)))
    assert not fits_tiles(quantize_int(w, 4, group_size=16))
    q = quantize_int(w, 4, group_size=32)
    shuffled = type(q)(q.qweight, q.qzeros, q.scales, q.g_idx[torch.randperm(128)], q.bits)
    assert not fits_tiles(shuffled)
    f = quantize_fp8(w)
    nan = f.data.clone()
    nan.view(torch.uint8)[3, 5] = 0xFF                     # e4m3 NaN: the per-expert path keeps it
    assert not fits_tiles(type(f)(nan, f.scales, f.block))
    assert not fits_tiles(type(f)(f.data, f.scales * 1e5, f.block))   # scales x 2^120 would overflow
    tiny = f.scales.clone()
    tiny[0, 0] = 2.0 ** -120                                # subnormal products, which the kernel would flush
    assert not fits_tiles(type(f)(f.data, tiny, f.block))
    tiny[0, 0] = 0.0                                        # a zero scale is fine
    assert fits_tiles(type(f)(f.data, tiny, f.block))


def test_pack_tiles_layout():
    """Tile (nb, kb) row p holds, for each of its 16 columns n, W[n][2p] and W[n][2p + 1]."""
    w = torch.arange(40 * 70, dtype=torch.float32).view(40, 70).bfloat16()
    tiles = fused.pack_tiles(w)
    assert tiles.shape == (64 // 16, 96 // 32, 16, 16, 2)
    n, kk = 37, 65                       # nb 2, kb 2: n 5 of the tile, pair 0 (k 64, 65)
    assert tiles[2, 2, 0, 5, 1] == w[n, kk]
    assert tiles[3, 0, 0, 0, 0] == 0    # padding rows (n >= 40) and columns (k >= 70) are zero
    assert tiles[0, 2, 15, 0, 1] == 0


def test_unknown_or_unavailable_isa_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MOEGEN_EXPERTS_ISA", "sse2")
    with pytest.raises(ConfigError, match="expected one of"):
        fused.chosen_isa()
    missing = [isa for isa in fused.ISA_CODES if isa not in ISAS]
    if missing:
        monkeypatch.setenv("MOEGEN_EXPERTS_ISA", missing[0])
        with pytest.raises(ConfigError, match="not available"):
            fused.chosen_isa()


@needs_native
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_with_packed_experts_stays_close_to_transformers(tiny_fixture, arch):
    """The model with its experts packed: bf16 logits within the bf16 tolerance of transformers
    (test_engine.py's 2% of the logit scale), and close to the per-expert path."""
    path = tiny_fixture(arch)
    seqs = [[1, 100, 200, 300, 400, 500, 17, 9], [5, 6, 7]]
    model = load_model(path, "bfloat16")
    plain = model.forward(seqs)
    moes = [layer.ffn for layer in model.layers if layer.is_moe]
    for moe in moes:
        assert moe.can_fuse(model.weights, model.dtype)
        moe.pack_fused(model.weights)
    assert all(moe.fused_names()[0] in model.weights for moe in moes)
    assert not any(".experts." in name for name in model.weights)
    packed = model.forward(seqs)
    for ours, theirs in zip(packed, plain):
        assert (ours.float() - theirs.float()).abs().max() <= 0.02 * theirs.float().abs().max()
    # (the 3-token prompt is left out here: on DeepSeek-V3's tiny fixture a bf16 routing near-tie
    # already puts the per-expert path 15% away from transformers there)
    ref = hf_logits(path, seqs[0], torch.bfloat16)
    assert (packed[0].float() - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory, tiny_fixture):
    """(arch, fmt) -> a tiny checkpoint quantized with groups of 32 (fp8: 128 x 128 blocks)."""
    def make(arch, fmt):
        out = tmp_path_factory.mktemp(f"{arch}-{fmt}") / "ckpt"
        return quantize_checkpoint(tiny_fixture(arch), out, fmt, group_size=32)[0]
    return make


@needs_native
@pytest.mark.parametrize("fmt", list(QUANTIZERS))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_with_quantized_experts_through_the_kernel(quantized_tiny, arch, fmt):
    """A quantized bf16 model with its experts packed: logits close to the same model on the
    per-expert path (which dequantizes chunk by chunk), and the packed codes no bigger than the
    checkpoint's own (no bf16 copy of any expert kept)."""
    model = load_model(quantized_tiny(arch, fmt), "bfloat16")
    seqs = [[1, 100, 200, 300, 400, 500, 17, 9]]
    plain = model.forward(seqs)
    moes = [layer.ffn for layer in model.layers if layer.is_moe]
    expert_bytes = sum(stored_bytes(model.weights[n]) for moe in moes for n in moe.expert_weight_names())
    for moe in moes:
        assert moe.can_fuse(model.weights, model.dtype)
        moe.pack_fused(model.weights)
    packed = [model.weights[name + suffix] for moe in moes for name in moe.fused_names()
              for suffix in PACKED_PARTS if name + suffix in model.weights]
    assert all(model.weights[name].dtype != torch.bfloat16 for moe in moes for name in moe.fused_names())
    assert sum(t.nbytes for t in packed) <= 1.6 * expert_bytes      # codes padded to 32, float32 scales
    ours = model.forward(seqs)[0].float()
    assert (ours - plain[0].float()).abs().max() <= 0.02 * plain[0].float().abs().max()


@needs_native
def test_experts_quantized_in_part_stay_on_the_per_expert_path(tmp_path, tiny_fixture):
    """GPTQ groups of 128 do not divide the tiny model's hidden size (64): gate_up stays bf16 and
    down is quantized. The kernel takes one format per layer, so such a layer keeps the per-expert
    path, and an engine over the checkpoint runs (it crashed packing the mixed layer before)."""
    path, left = quantize_checkpoint(tiny_fixture("mixtral"), tmp_path / "ckpt", "int4")
    assert any(name.endswith("w1.weight") for name in left)            # gate/up left in bf16
    model = load_model(path, "bfloat16")
    moes = [layer.ffn for layer in model.layers if layer.is_moe]
    assert not any(moe.can_fuse(model.weights, model.dtype) for moe in moes)
    engine = Engine.from_pretrained(path, dtype="bfloat16", kv_cache_memory=8 << 20)
    out = engine.generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4


@needs_native
def test_engine_packs_bf16_experts_and_leaves_float32_alone(tiny_fixture):
    path = tiny_fixture("qwen3_moe")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    bf16 = Engine.from_pretrained(path, dtype="bfloat16", kv_cache_memory=8 << 20, experts_kernel="fused")
    assert any(name.endswith(fused.GATE_UP) for name in bf16.model.weights)
    out = bf16.generate([[1, 2, 3, 4], [9, 8, 7]], params)
    assert [len(c.token_ids) for c in out] == [6, 6]
    f32 = Engine.from_pretrained(path, dtype="float32", kv_cache_memory=8 << 20)
    assert not any(name.endswith(fused.GATE_UP) for name in f32.model.weights)
    plain = Engine.from_pretrained(path, dtype="bfloat16", kv_cache_memory=8 << 20, experts_kernel="torch")
    assert not any(name.endswith(fused.GATE_UP) for name in plain.model.weights)


def test_experts_kernel_fused_where_it_cannot_run_is_a_clear_error(tiny_fixture):
    with pytest.raises(InputError, match="experts_kernel=fused"):
        Engine.from_pretrained(tiny_fixture("mixtral"), dtype="float32", kv_cache_memory=8 << 20,
                               experts_kernel="fused")


@needs_native
def test_auto_takes_the_kernel_where_it_is_the_faster_path(tiny_fixture, monkeypatch):
    """auto: AMX, AVX-512 BF16 on AMD (or a forced ISA) packs; elsewhere oneDNN's per-expert GEMMs stay."""
    path = tiny_fixture("olmoe")
    engine = Engine.from_pretrained(path, dtype="bfloat16", kv_cache_memory=8 << 20)
    packed = any(name.endswith(fused.GATE_UP) for name in engine.model.weights)
    amd = cpu.vendor() == "AuthenticAMD"
    assert packed == (fused.auto_isa() is not None) == ("amx" in ISAS or (amd and "avx512-bf16" in ISAS))
    monkeypatch.setenv("MOEGEN_EXPERTS_ISA", "generic")
    forced = Engine.from_pretrained(path, dtype="bfloat16", kv_cache_memory=8 << 20)
    assert any(name.endswith(fused.GATE_UP) for name in forced.model.weights)
    out = forced.generate([[3, 4, 5]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3


@pytest.mark.parametrize("vendor,isas,forced,expected", [
    ("GenuineIntel", ["amx", "avx512-bf16", "generic"], "", "amx"),
    ("GenuineIntel", ["avx512-bf16", "generic"], "", None),        # AMX listed but unusable: oneDNN
    ("AuthenticAMD", ["avx512-bf16", "generic"], "", "avx512-bf16"),
    ("AuthenticAMD", ["generic"], "", None),                       # the portable path: forcing only
    ("GenuineIntel", ["avx512-bf16", "generic"], "generic", "generic"),
    ("AuthenticAMD", [], "", None),                                # no native kernels
])
def test_auto_isa_rules(vendor, isas, forced, expected, monkeypatch):
    monkeypatch.setattr(cpu, "vendor", lambda: vendor)
    monkeypatch.setattr(fused, "available_isas", lambda: isas)
    monkeypatch.setenv("MOEGEN_EXPERTS_ISA", forced)
    assert fused.auto_isa() == expected


@needs_native
def test_a_model_packed_for_the_kernel_is_refused_where_plain_experts_are_needed(tiny_fixture):
    from moegen.engine.config import EngineConfig
    model = load_model(tiny_fixture("mixtral"), "bfloat16")
    Engine(model, None, EngineConfig(kv_cache_bytes=8 << 20, experts_kernel="fused", prepack=False))
    with pytest.raises(InputError, match="fused experts kernel"):
        Engine(model, None, EngineConfig(kv_cache_bytes=8 << 20, streaming="staged"))
    with pytest.raises(InputError, match="experts_kernel=torch"):
        Engine(model, None, EngineConfig(kv_cache_bytes=8 << 20, experts_kernel="torch"))
