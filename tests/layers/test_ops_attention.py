"""Decode attention over the paged KV cache: native kernel and PyTorch fallback vs a float64
reference, edge cases, argument checking and the build/fallback machinery."""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings, strategies as st

from moegen.ops import attention as attn
from moegen.ops import cpu
from moegen.ops import build
from tests.layers.test_fused_experts import QUANTIZERS, check_dequant_tiles
from tests.layers.test_ops_elementwise import check_ops as check_elementwise_ops

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = list(TOL)
# Lengths 1..2000: block boundaries, one-token contexts and long ones, unsorted.
LENS = [1, 2000, 15, 16, 17, 1, 333, 1024, 64, 1999, 5, 700]


# ---------------------------------------------------------------------------------------------
# Fixtures: the implementations under test.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native():
    if not build.native_enabled():
        pytest.skip("MOEGEN_NATIVE=0: native kernels disabled")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build must fail these tests, not skip them
        ops = build.native_ops()
    assert ops is not None
    return ops


@pytest.fixture(params=["native", "torch"])
def impl(request):
    """(gqa, mla) callables of one implementation."""
    if request.param == "torch":
        return attn.paged_decode_attention_torch, attn.paged_decode_attention_mla_torch
    ops = request.getfixturevalue("native").ops
    return ops.paged_decode_attention, ops.paged_decode_attention_mla


# ---------------------------------------------------------------------------------------------
# Test data and the float64 reference.
# ---------------------------------------------------------------------------------------------


def make_tables(lens, block_size, gen, spare_blocks=3):
    """Shuffled, non-contiguous block tables; unused entries hold garbage ids (-1, huge)."""
    n_blocks = [math.ceil(n / block_size) for n in lens]
    total = sum(n_blocks) + spare_blocks
    perm = torch.randperm(total, generator=gen).to(torch.int32)
    max_blocks = max(n_blocks) + 2
    tables = torch.full((len(lens), max_blocks), -1, dtype=torch.int32)
    tables[:, -1] = 1 << 30
    at = 0
    for s, n in enumerate(n_blocks):
        tables[s, :n] = perm[at : at + n]
        at += n
    return tables, torch.tensor(lens, dtype=torch.int32), total


def poison_unused(cache, tables, lens, block_size):
    """NaN everywhere no sequence owns, so reading past a context shows up in the output."""
    used = torch.zeros(cache.shape[:2], dtype=torch.bool)
    for s, n in enumerate(lens.tolist()):
        t = torch.arange(n)
        used[tables[s, t // block_size].long(), t % block_size] = True
    cache[~used] = float("nan")


def make_gqa(lens, n_heads, n_kv, head_dim, block_size, dtype, seed=0, q_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    tables, lens_t, total = make_tables(lens, block_size, gen)
    k = torch.randn(total, block_size, n_kv, head_dim, generator=gen)
    v = torch.randn(total, block_size, n_kv, head_dim, generator=gen)
    q = torch.randn(len(lens), n_heads, head_dim, generator=gen) * q_scale
    for c in (k, v):
        poison_unused(c, tables, lens_t, block_size)
    return q.to(dtype), k.to(dtype), v.to(dtype), tables, lens_t


def make_mla(lens, n_heads, rank, rope, block_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tables, lens_t, total = make_tables(lens, block_size, gen)
    kv = torch.randn(total, block_size, rank + rope, generator=gen)
    q = torch.randn(len(lens), n_heads, rank + rope, generator=gen)
    poison_unused(kv, tables, lens_t, block_size)
    return q.to(dtype), kv.to(dtype), tables, lens_t


def reference(q, k, v, tables, lens, scale, window=0):
    """float64 attention, one sequence at a time, from the same (rounded) inputs.
    k, v: [blocks, block_size, kv_heads, d] (for MLA pass kv[..., None, :] and V = prefix)."""
    block_size, n_kv = k.shape[1], k.shape[2]
    out = []
    for s in range(q.shape[0]):
        n = int(lens[s])
        t = torch.arange(max(0, n - window) if window else 0, n)
        blocks, offs = tables[s, t // block_size].long(), t % block_size
        ks, vs = k[blocks, offs].double(), v[blocks, offs].double()  # [T, kvh, d]
        qs = q[s].double().view(n_kv, -1, q.shape[-1])  # [kvh, group, d]
        p = torch.softmax(torch.einsum("hgd,thd->hgt", qs, ks) * scale, dim=-1)
        out.append(torch.einsum("hgt,thd->hgd", p, vs).reshape(q.shape[1], -1))
    return torch.stack(out)


def reference_logits(q, k, tables, lens, scale):
    """All valid scaled logits of every sequence and head, flattened (float64)."""
    block_size, n_kv = k.shape[1], k.shape[2]
    out = []
    for s in range(q.shape[0]):
        t = torch.arange(int(lens[s]))
        ks = k[tables[s, t // block_size].long(), t % block_size].double()
        qs = q[s].double().view(n_kv, -1, q.shape[-1])
        out.append(torch.einsum("hgd,thd->hgt", qs, ks).flatten() * scale)
    return torch.cat(out)


def mla_reference(q, kv, tables, lens, scale, rank):
    return reference(q, kv[:, :, None, :], kv[:, :, None, :rank], tables, lens, scale)


def rel_err(out, ref, scale=None):
    """Max abs error over `scale` (default: the reference's max). Outputs are convex combinations
    of V rows, so pass max|V| where the result may cancel to near zero (tiny head dims)."""
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return ((out.double() - ref).abs().max() / (ref.abs().max() if scale is None else scale)).item()


# ---------------------------------------------------------------------------------------------
# Accuracy.
# ---------------------------------------------------------------------------------------------

GQA_CONFIGS = [  # (n_heads, n_kv, head_dim, block_size): GQA ratios 1/4/8, odd block & dims
    (4, 4, 64, 16),
    (32, 8, 128, 32),
    (16, 2, 80, 7),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", GQA_CONFIGS, ids=lambda c: "h{}-kv{}-d{}-bs{}".format(*c))
def test_gqa_matches_reference(impl, config, dtype):
    n_heads, n_kv, d, bs = config
    q, k, v, tables, lens = make_gqa(LENS, n_heads, n_kv, d, bs, dtype)
    scale = d**-0.5
    out = impl[0](q, k, v, tables, lens, scale, 0)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, reference(q, k, v, tables, lens, scale)) < TOL[dtype]


MLA_CONFIGS = [  # (n_heads, kv_lora_rank, rope_dim, block_size)
    (16, 64, 16, 16),
    (20, 512, 64, 32),  # head count not a power of two
    (4, 72, 16, 5),  # widths that are not a whole number of vectors
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", MLA_CONFIGS, ids=lambda c: "h{}-r{}-p{}-bs{}".format(*c))
def test_mla_matches_reference(impl, config, dtype):
    n_heads, rank, rope, bs = config
    lens = LENS[:6]
    q, kv, tables, lens_t = make_mla(lens, n_heads, rank, rope, bs, dtype)
    scale = (rank + rope) ** -0.5
    out = impl[1](q, kv, tables, lens_t, scale, rank)
    assert out.shape == (len(lens), n_heads, rank) and out.dtype == dtype
    assert rel_err(out, mla_reference(q, kv, tables, lens_t, scale, rank)) < TOL[dtype]


def test_few_sequences_split_across_threads(impl):
    """One or two sequences: the native kernel splits kv heads and head chunks into items."""
    q, k, v, tables, lens = make_gqa([1500, 3], 64, 8, 64, 16, torch.float32, seed=3)
    assert rel_err(impl[0](q, k, v, tables, lens, 0.125, 0), reference(q, k, v, tables, lens, 0.125)) < 1e-5
    q, kv, tables, lens = make_mla([900], 128, 64, 16, 16, torch.float32, seed=4)
    out = impl[1](q, kv, tables, lens, 0.1, 64)
    assert rel_err(out, mla_reference(q, kv, tables, lens, 0.1, 64)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits_stay_finite_and_correct(impl, dtype):
    """Logits reach +-1e4: exp of an unshifted logit would overflow; online softmax must not."""
    d, scale = 64, 0.125
    q, k, v, tables, lens = make_gqa(LENS[:8], 8, 2, d, 16, torch.float32, seed=1)
    # q.k ~ N(0, |q|^2) for unit-normal K: |q| = 1e4 / (3 scale) puts the extremes near +-1e4.
    q = (q / q.norm(dim=-1, keepdim=True) * (1e4 / (3 * scale))).to(dtype)
    k, v = k.to(dtype), v.to(dtype)
    ref = reference(q, k, v, tables, lens, scale)
    logits = reference_logits(q, k, tables, lens, scale)
    assert logits.max() > 5e3 and logits.min() < -5e3  # the premise: logits really are huge
    out = impl[0](q, k, v, tables, lens, scale, 0)
    # Rounding a 1e4 logit moves it by ~1e4 * eps: allow that, far below any overflow symptom.
    assert rel_err(out, ref) < (1e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("window", [1, 7, 100, 5000])
def test_sliding_window(impl, window):
    q, k, v, tables, lens = make_gqa(LENS, 8, 2, 64, 16, torch.float32, seed=2)
    out = impl[0](q, k, v, tables, lens, 0.125, window)
    assert rel_err(out, reference(q, k, v, tables, lens, 0.125, window)) < 1e-5


@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.integers(1, 300), min_size=1, max_size=6),
    n_kv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3, 5, 8]),
    head_dim=st.sampled_from([1, 8, 17, 64, 96]),
    block_size=st.sampled_from([1, 3, 16]),
    window=st.sampled_from([0, 0, 1, 10, 100]),
    seed=st.integers(0, 2**16),
)
def test_random_batches_match_reference(lens, n_kv, group, head_dim, block_size, window, seed):
    q, k, v, tables, lens_t = make_gqa(lens, n_kv * group, n_kv, head_dim, block_size, torch.float32, seed)
    scale = head_dim**-0.5
    ref = reference(q, k, v, tables, lens_t, scale, window)
    for fn in (attn.paged_decode_attention, attn.paged_decode_attention_torch):
        assert rel_err(fn(q, k, v, tables, lens_t, scale, window), ref, v.abs().nan_to_num(0.0).max().item()) < 1e-5  # poisoned unused blocks hold NaN


def test_concurrent_calls_agree(native):
    q, k, v, tables, lens = make_gqa(LENS, 8, 2, 64, 16, torch.bfloat16, seed=5)
    expected = native.ops.paged_decode_attention(q, k, v, tables, lens, 0.125, 0)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: native.ops.paged_decode_attention(q, k, v, tables, lens, 0.125, 0), range(8)))
    assert all(torch.equal(o, expected) for o in outs)


# ---------------------------------------------------------------------------------------------
# Argument checking.
# ---------------------------------------------------------------------------------------------


def _bad_gqa_cases():
    q, k, v, tables, lens = make_gqa([5, 40], 4, 2, 16, 16, torch.float32)
    ok = dict(q=q, k_cache=k, v_cache=v, block_tables=tables, context_lens=lens)
    return {
        "q-2d": dict(ok, q=q[0]),
        "q-dtype": dict(ok, q=q.double()),
        "cache-dtype": dict(ok, k_cache=k.half()),
        "kv-shape": dict(ok, v_cache=v[:-1]),
        "head-dim": dict(ok, q=q[..., :8].contiguous()),
        "heads-not-multiple": dict(ok, q=q[:, :3].contiguous()),
        "tables-int64": dict(ok, block_tables=tables.long()),
        "lens-int64": dict(ok, context_lens=lens.long()),
        "lens-count": dict(ok, context_lens=lens[:1]),
        "zero-context": dict(ok, context_lens=torch.tensor([0, 40], dtype=torch.int32)),
        "context-too-long": dict(ok, context_lens=torch.tensor([5, 10_000], dtype=torch.int32)),
        "block-out-of-range": dict(ok, block_tables=torch.where(tables >= 0, tables + 1000, tables)),
    }


@pytest.mark.parametrize("case", list(_bad_gqa_cases()))
def test_bad_gqa_inputs_raise(impl, case):
    args = _bad_gqa_cases()[case]
    with pytest.raises((ValueError, TypeError)) as info:
        impl[0](args["q"], args["k_cache"], args["v_cache"], args["block_tables"], args["context_lens"], 1.0, 0)
    assert "paged_decode_attention" in str(info.value)


@pytest.mark.parametrize("case", ["width", "rank-too-big", "rank-zero", "cache-3d"])
def test_bad_mla_inputs_raise(impl, case):
    q, kv, tables, lens = make_mla([5, 40], 4, 32, 16, 16, torch.float32)
    rank = 32
    if case == "width":
        q = q[..., :40].contiguous()
    elif case == "rank-too-big":
        rank = 49
    elif case == "rank-zero":
        rank = 0
    else:
        kv = kv[..., None]
    with pytest.raises((ValueError, TypeError)) as info:
        impl[1](q, kv, tables, lens, 1.0, rank)
    assert "paged_decode_attention_mla" in str(info.value)


def test_negative_window_raises(impl):
    q, k, v, tables, lens = make_gqa([5], 4, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="sliding_window"):
        impl[0](q, k, v, tables, lens, 1.0, -1)


# ---------------------------------------------------------------------------------------------
# Dispatch, build cache and fallback.
# ---------------------------------------------------------------------------------------------


def test_dispatch_uses_native_and_reports_it(native):
    assert attn.attention_impl() == native.impl and native.impl.startswith("native")
    q, k, v, tables, lens = make_gqa([30, 9], 8, 2, 32, 16, torch.float32)
    assert torch.equal(
        attn.paged_decode_attention(q, k, v, tables, lens, 0.2),
        native.ops.paged_decode_attention(q, k, v, tables, lens, 0.2, 0),
    )
    result = build.build_ops()
    assert result.ok and native.impl in str(result) and str(build.cache_root()) in str(result)


def test_env_disables_native(monkeypatch):
    monkeypatch.setenv("MOEGEN_NATIVE", "0")
    assert attn.attention_impl() == "torch"
    assert not build.build_ops().ok
    q, k, v, tables, lens = make_gqa([30, 9], 8, 2, 32, 16, torch.float32)
    assert torch.equal(
        attn.paged_decode_attention(q, k, v, tables, lens, 0.2),
        attn.paged_decode_attention_torch(q, k, v, tables, lens, 0.2),
    )


def test_build_key_tracks_inputs(tmp_path):
    src = tmp_path / "a.cpp"
    src.write_text("int x;")
    key = build.build_key(src, ("-O3",), ())
    assert key == build.build_key(src, ("-O3",), ())
    assert key != build.build_key(src, ("-O2",), ())
    src.write_text("int y;")
    assert key != build.build_key(src, ("-O3",), ())


def test_header_change_rebuilds(monkeypatch, tmp_path):
    """The kernels' headers are hashed and snapshotted with the sources, taken from beside them (a
    variant tree's own headers, not this checkout's): editing one means a new build."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tree = tmp_path / "csrc"
    tree.mkdir()
    sources = tuple(tree / s.name for s in build.SOURCES)
    for s in build.SOURCES:
        (tree / s.name).write_bytes(s.read_bytes())
    header = tree / "simd.h"
    builds = []

    def record_build(codes, build_dir, *args):
        builds.append((build_dir, dict(codes)))
        raise RuntimeError("not compiled in this test")

    monkeypatch.setattr(build, "_compile", record_build)
    for text in (b"// one", b"// two"):
        header.write_bytes(text)
        build._try_load(sources, (), "moegen_ops_header", False)
    (dir_one, codes_one), (dir_two, codes_two) = builds
    assert dir_one != dir_two
    assert codes_one["simd.h"] == b"// one" and codes_two["simd.h"] == b"// two"
    assert "amx.h" not in codes_one    # absent from that tree: not taken from this checkout


@pytest.fixture
def fresh_loader():
    """Lets a test make the process-wide loader retry; restores it afterwards."""
    build.reset()
    yield
    build.reset()


def test_broken_build_falls_back_with_one_warning(monkeypatch, fresh_loader):
    monkeypatch.setenv("MOEGEN_OPS_CFLAGS", "-DMOEGEN_FORCE_BUILD_ERROR")
    q, k, v, tables, lens = make_gqa([30, 9], 8, 2, 32, 16, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = attn.paged_decode_attention(q, k, v, tables, lens, 0.2)
        out2 = attn.paged_decode_attention(q, k, v, tables, lens, 0.2)
        impl_name = attn.attention_impl()
    assert impl_name == "torch"
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    log = msgs[0].rsplit("Compiler output: ", 1)[1]
    assert "MOEGEN_FORCE_BUILD_ERROR" in open(log, encoding="utf-8").read()
    expected = attn.paged_decode_attention_torch(q, k, v, tables, lens, 0.2)
    assert torch.equal(out1, expected) and torch.equal(out2, expected)
    result = build.build_ops()
    assert not result.ok and str(log) in str(result)


def test_missing_source_falls_back(tmp_path):
    with pytest.warns(RuntimeWarning, match="not found"):
        assert build.load_native(source=tmp_path / "missing.cpp", namespace="moegen_ops_missing") is None


# ---------------------------------------------------------------------------------------------
# The other SIMD code paths (AVX2, portable scalar), forced on this machine by macro.
# ---------------------------------------------------------------------------------------------

VARIANTS = {"avx2": "-DMOEGEN_SIMD_AVX2", "scalar": "-DMOEGEN_SIMD_SCALAR"}


@pytest.fixture(scope="module")
def variants(native):
    def load(name):  # own ops namespace each, so they can live beside the default build
        return name, build.load_native(extra_cflags=(VARIANTS[name],), namespace=f"moegen_ops_{name}")

    with ThreadPoolExecutor(len(VARIANTS)) as pool:  # compile both at once (cold cache)
        return dict(pool.map(load, VARIANTS))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_other_simd_paths(variants, variant):
    ops = variants[variant]
    assert ops is not None
    if variant == "avx2" and "avx2" not in cpu.flags():
        pytest.skip("CPU without AVX2")
    assert ops.impl == {"avx2": "native-avx2", "scalar": "native"}[variant]
    q, k, v, tables, lens = make_gqa([1, 40, 300, 17], 16, 2, 72, 7, torch.bfloat16, seed=6)
    ref = reference(q, k, v, tables, lens, 0.1, 0)
    assert rel_err(ops.ops.paged_decode_attention(q, k, v, tables, lens, 0.1, 0), ref) < 1e-2
    q, kv, tables, lens = make_mla([1, 70, 33], 20, 64, 16, 16, torch.float32, seed=7)
    out = ops.ops.paged_decode_attention_mla(q, kv, tables, lens, 0.1, 64)
    assert rel_err(out, mla_reference(q, kv, tables, lens, 0.1, 64)) < 1e-5
    check_elementwise_ops(ops.ops, torch.bfloat16)     # the same library's fused elementwise ops
    for fmt in QUANTIZERS:                              # and its dequantization of the experts kernel's tiles
        check_dequant_tiles(ops.ops, fmt)
    assert not ops.ops.prefill_attention_available()    # prefill attention: AVX-512 BF16 builds only
    if variant == "avx2":  # its own fp16 stores; scalar fp16 RMSNorm sums in another order, 2 ulps off at times
        check_elementwise_ops(ops.ops, torch.float16)
