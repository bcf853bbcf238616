"""The AMX tile paths of the native kernels on any x86 CPU with AVX-512: a build with
-DMOEGEN_AMX_EMULATE runs csrc/amx.h's software tiles (each instruction as the ISA reference states
it; a product whose tile shapes the configuration does not allow is an error, as the CPU's #UD), so
the tile code of the exact experts kernel (bf16 and its quantized formats), of prefill attention and
of the int8 experts kernel is tested here as it runs on an AMX CPU -- where the real tiles also run
the other tests of these kernels. A second build compiles the real tile instructions
(-mamx-tile -mamx-int8 -mamx-bf16), which a CPU without AMX never builds otherwise."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moegen.ops import build
from moegen.ops import cpu
from moegen.ops import experts as fused
from moegen.ops import prefill_attention as pa
from moegen.layers.quantized import dequantize, tile_codes
from tests.layers.test_experts_int8 import run as run_int8
from tests.layers.test_fused_experts import (QUANTIZERS, assert_bf16_close, random_layer, reference, routing,
                                             small_integer_layer)
from tests.layers.test_prefill_attention import _inputs, _per_prompt

# what the tile paths need beside the tiles: their epilogues and softmax are AVX-512 (BF16) code
pytestmark = pytest.mark.skipif(
    not {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"} <= cpu.flags() or build.native_ops() is None,
    reason="the AMX kernels' vector code needs AVX-512 BF16 and VNNI, and moegen's native build")

SOURCES = tuple(build.CSRC / f for f in ("decode_attention.cpp", "experts.cpp", "experts_int8.cpp",
                                          "prefill_attention.cpp"))


BUILDS = {"emulated": ("-DMOEGEN_AMX_EMULATE",), "compiled": ("-mamx-tile", "-mamx-int8", "-mamx-bf16")}


@pytest.fixture(scope="module")
def builds():
    """The kernels built on emulated tiles, and with the real tile instructions compiled in (each
    its own op namespace, beside the real build), both at once."""
    def load(name):
        return name, build.load_native(source=SOURCES, extra_cflags=BUILDS[name], namespace=f"moegen_ops_amx_{name}")

    with ThreadPoolExecutor(len(BUILDS)) as pool:
        out = dict(pool.map(load, BUILDS))
    for name, ops in out.items():
        assert ops is not None, f"the {name}-AMX build failed (see the build log)"
    return out


@pytest.fixture(scope="module")
def emulated(builds):
    return builds["emulated"]


@pytest.fixture
def on_tiles(monkeypatch, emulated):
    """moegen.ops' kernels run from the emulated build, each on its AMX path."""
    for module in (fused, pa):
        monkeypatch.setattr(module, "native_ops", lambda verbose=False: emulated)
    monkeypatch.setenv("MOEGEN_EXPERTS_ISA", "amx")
    monkeypatch.setenv("MOEGEN_EXPERTS_INT8_ISA", "amx-int8")
    return emulated


def isas_of(ops) -> dict:
    return {"experts": ops.experts_isas(), "int8": ops.experts_int8_isas(), "prefill": ops.prefill_attention_isas()}


def test_the_emulated_build_offers_the_tile_paths_first(builds):
    assert {k: v[0] for k, v in isas_of(builds["emulated"].ops).items()} == \
        {"experts": "amx", "int8": "amx-int8", "prefill": "amx"}
    # the builds with real tile instructions -- this one, and the default beside it -- offer them
    # only where the CPU has them (internal linkage: the emulated build's answers are its own)
    flags = cpu.flags()
    for ops in (builds["compiled"].ops, build.native_ops().ops):
        isas = isas_of(ops)
        if "amx_bf16" not in flags:
            assert "amx" not in isas["experts"] and "amx" not in isas["prefill"]
        if "amx_int8" not in flags:
            assert "amx-int8" not in isas["int8"]


def tile_products(emulated):
    """Tile products the emulated build has run (every kernel)."""
    return emulated.ops.amx_emulated_tile_products()


@pytest.mark.parametrize("hidden,inter,experts,k,tokens,only", [
    (100, 70, 5, 2, 23, None),           # padded tiles; one row tile per expert
    (64, 32, 8, 2, 40, [1, 6]),          # experts with zero tokens among busy ones
    (96, 48, 8, 2, 1, None),             # one token
    (64, 48, 4, 2, 150, None),           # ~75 rows an expert: several 32-row blocks and a tail
    (64, 32, 16, 8, 50, None),           # fine-grained: top-8 of 16
])
def test_exact_kernel_on_tiles_matches_the_per_expert_path(on_tiles, hidden, inter, experts, k, tokens, only):
    assert fused.chosen_isa() == "amx"
    gate_ups, downs = random_layer(hidden, inter, experts)
    d = routing(tokens, experts, k, only=only)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).bfloat16()
    gate_up, down = fused.pack_layer(gate_ups, downs, inter)
    before = tile_products(on_tiles)
    assert_bf16_close(fused.moe_experts(x, d.token_idx, d.weights, d.counts, gate_up, down, inter, k),
                      reference(x, d, gate_ups, downs))
    assert tile_products(on_tiles) > before      # the tiles did the multiplying


def test_exact_kernel_on_tiles_by_experts_and_by_columns_agree(on_tiles):
    """One thread (whole experts per item) and more threads than items (items by output columns,
    h shared between two phases): the same tile arithmetic, bit for bit."""
    gate_ups, downs = random_layer(64, 96, 3)
    d = routing(70, 3, 2)
    x = torch.randn(70, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    gate_up, down = fused.pack_layer(gate_ups, downs, 96)
    threads, outs = torch.get_num_threads(), []
    try:
        for n in (1, 64):
            torch.set_num_threads(n)
            outs.append(fused.moe_experts(x, d.token_idx, d.weights, d.counts, gate_up, down, 96, 2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert_bf16_close(outs[0], reference(x, d, gate_ups, downs))


def test_exact_kernel_on_tiles_is_exact_on_small_integers(on_tiles):
    """All sums exact: the tiles' result is the reference's, bit for bit."""
    gate_ups, downs, d, x, gate_up, down = small_integer_layer(40)
    assert torch.equal(fused.moe_experts(x, d.token_idx, d.weights, d.counts, gate_up, down, 32, 2),
                       reference(x, d, gate_ups, downs))


@pytest.mark.parametrize("fmt", list(QUANTIZERS))
@pytest.mark.parametrize("hidden,inter,experts,k,tokens", [
    (128, 64, 4, 2, 37),                 # decode-sized: tiles dequantized while the tiles multiply
    (128, 64, 2, 1, 600),                # ~300 rows an expert (over one 256-row chunk): all up front
])
def test_quantized_experts_on_tiles_match_their_dequantized_weights(on_tiles, fmt, hidden, inter, experts, k,
                                                                    tokens):
    plain_gu, plain_dn = random_layer(hidden, inter, experts)
    gate_ups, downs = [QUANTIZERS[fmt](w) for w in plain_gu], [QUANTIZERS[fmt](w) for w in plain_dn]
    d = routing(tokens, experts, k)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).bfloat16()
    gate_up, down = fused.pack_layer([tile_codes(w) for w in gate_ups], [tile_codes(w) for w in downs], inter)
    ours = fused.moe_experts(x, d.token_idx, d.weights, d.counts, gate_up, down, inter, k)
    deq = lambda ws: [dequantize(w, torch.bfloat16) for w in ws]
    assert_bf16_close(ours, reference(x, d, deq(gate_ups), deq(downs)))


@pytest.mark.parametrize("hidden,inter,experts,k,tokens,only", [
    (64, 64, 4, 2, 37, None),            # the int8 tiles' multiples; one row tile an expert, or two
    (100, 70, 5, 2, 23, None),           # padded tiles
    (64, 32, 8, 2, 40, [1, 6]),          # experts with zero tokens
    (96, 48, 8, 2, 1, None),             # one token: a row tile of one row
    (64, 64, 1, 1, 17, None),            # one expert of 17 rows: two row tiles, the second of one row
    (128, 200, 1, 1, 50, None),          # 50 rows: a full 32-row call, then 18 rows (two tiles)
    (128, 200, 3, 2, 110, None),         # ~73 rows an expert: 32-row calls and a tail
    (64, 32, 16, 8, 50, None),           # fine-grained
])
def test_int8_kernel_on_tiles_equals_the_portable_kernel(on_tiles, monkeypatch, hidden, inter, experts, k, tokens,
                                                          only):
    """Same integer dot products, same float steps: identical to the portable C++ kernel (and so to
    the VNNI one, tests/layers/test_experts_int8.py). One thread, so that each expert is one item
    and its rows run as the cases say (more threads cut experts into smaller items)."""
    gate_ups, downs = random_layer(hidden, inter, experts)
    d = routing(tokens, experts, k, only=only)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = tile_products(on_tiles)
        tiles = run_int8("amx-int8", monkeypatch, x, d, gate_ups, downs)
        after = tile_products(on_tiles)
        portable = run_int8("generic", monkeypatch, x, d, gate_ups, downs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(tiles, portable)
    assert tiles.shape == (tokens, hidden) and (not tokens or tiles.abs().sum() > 0)
    assert (after > before) == (tokens > 0) and tile_products(on_tiles) == after


@pytest.mark.parametrize("lens,heads,kv_heads,dim,dv,window", [
    ([1, 5, 31, 33, 70], 4, 2, 128, 128, 0),     # ragged, not multiples of the 32-row block
    ([90, 20], 4, 4, 64, 64, 40),                # sliding window
    ([40], 2, 2, 192, 128, 0),                   # MLA's head sizes
])
def test_prefill_attention_on_tiles_has_sdpa_bf16_error(on_tiles, lens, heads, kv_heads, dim, dv, window):
    q, k, v = _inputs(lens, heads, kv_heads, dim, dv)
    scale = dim ** -0.5
    before = tile_products(on_tiles)
    got = pa.prefill_attention(q, k, v, lens, scale, window, isa="amx")
    assert tile_products(on_tiles) > before
    exact = _per_prompt(q.float(), k.float(), v.float(), lens, scale, window)
    sdpa = _per_prompt(q, k, v, lens, scale, window)
    err, sdpa_err = (got.float() - exact).abs(), (sdpa.float() - exact).abs()
    assert err.max() <= 2 * sdpa_err.max() and err.mean() <= 1.5 * sdpa_err.mean()
