"""Fused elementwise kernels (csrc/elementwise.cpp) against the eager PyTorch sequences they replace."""
import pytest
import torch
import torch.nn.functional as F

from moegen.layers.norm import rms_norm
from moegen.layers.rotary import RotaryEmbedding
from moegen.ops.build import native_ops
from moegen.ops.elementwise import fused_ops

DTYPES = [torch.bfloat16, torch.float16]
# RMSNorm sums squares in another order than torch.mean, and exp may differ in its last fp32 ulp:
# both can move a value across a bf16/fp16 rounding boundary, so a few elements may differ by one
# ulp of the storage type (fp16's finer grid is crossed more often). Everything else is bit-identical.
MAX_ULP_FLIPS = {torch.bfloat16: 1e-3, torch.float16: 1e-2}


@pytest.fixture(scope="module")
def ops():
    lib = native_ops()
    assert lib is not None, "the native library must build on this machine"
    return lib.ops


def eager_rms_norm(x, w, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def eager_rope(x, cos, sin):
    half = x.shape[-1] // 2
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def assert_equal_but_rare_ulp(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    differ = (got != want) & ~(got.isnan() & want.isnan())
    assert differ.float().mean().item() <= MAX_ULP_FLIPS[dtype]
    if differ.any():
        ulp = torch.finfo(dtype).eps * want[differ].float().abs()
        assert ((got[differ].float() - want[differ].float()).abs() <= ulp * 1.01).all()


def check_ops(ops, dtype, seed=0):
    """Every fused op against eager on shapes with and without a SIMD tail, plus special values."""
    g = torch.Generator().manual_seed(seed)
    for hidden in (1024, 100, 7):
        x = (torch.randn(97, hidden, generator=g) * 3).to(dtype)
        w = torch.randn(hidden, generator=g).to(dtype)
        assert_equal_but_rare_ulp(ops.rms_norm(x, w, 1e-5), eager_rms_norm(x, w, 1e-5), dtype)
    x3 = torch.randn(5, 4, 64, generator=g).to(dtype)       # per-head norm: weight over the last dim
    w3 = torch.randn(64, generator=g).to(dtype)
    assert_equal_but_rare_ulp(ops.rms_norm(x3, w3, 1e-6), eager_rms_norm(x3, w3, 1e-6), dtype)
    for inter in (3584, 37):
        gu = (torch.randn(61, 2 * inter, generator=g) * 4).to(dtype)
        # -90, -100: e^-g overflows to inf and silu is -0, as eager's; -88.5: e^-g is finite, near FLT_MAX
        specials = [-100.0, -90.0, 60.0, 0.0, float("inf"), -float("inf"), float("nan"), 11.0, -88.5]
        gu[0, : len(specials)] = torch.tensor(specials)
        gate, up = gu.chunk(2, dim=-1)
        assert_equal_but_rare_ulp(ops.silu_mul(gu), F.silu(gate) * up, dtype)
    for dim, heads in ((128, 16), (64, 3), (24, 2)):
        x = torch.randn(33, heads, dim, generator=g).to(dtype)
        cos, sin = torch.randn(2, 33, dim, generator=g).to(dtype)
        assert torch.equal(ops.rope(x, cos, sin), eager_rope(x, cos, sin))
    if dtype == torch.bfloat16:
        check_first_max(ops, g)


def check_first_max(ops, g):
    """The greedy choice against max(dim): the first maximum's index and value, ties, signed zeros,
    infinities, NaN, rows with and without a tail past the vector steps."""
    for vocab in (32000, 32001, 40, 31, 1):
        x = (torch.randn(23, vocab, generator=g) * 4).bfloat16()
        if vocab >= 40:
            x[1, [3, 17, 39]] = 50.0                             # ties: the first one wins
            x[2] = -0.0
            x[2, 9] = 0.0                                        # -0 and +0 compare equal: index 0
            x[3] = -float("inf")                                 # a row of -inf: index 0, value -inf
            x[4, [33, 7]] = float("inf")
            x[5] = -x[5].abs()
            x[5, 35] = -0.0                                      # the maximum is a zero after negatives
            x[6, 20] = float("nan")
            x[7, vocab - 1] = 60.0                               # the last element (in the tail if any)
        values, indices = ops.first_max(x)
        want = x.max(dim=-1)
        nan = want.values.isnan()
        assert torch.equal(values.isnan(), nan)
        assert torch.equal(indices[~nan], want.indices[~nan]), vocab
        assert torch.equal(values[~nan], want.values[~nan].float()), vocab


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_ops_match_eager(ops, dtype):
    check_ops(ops, dtype)


def test_fused_ops_take_strided_inputs(ops):
    gu = torch.randn(8, 40).bfloat16()[:, :20]              # rows not contiguous
    gate, up = gu.chunk(2, dim=-1)
    assert torch.equal(ops.silu_mul(gu), F.silu(gate) * up)
    q = torch.randn(6, 2 * 3 * 16).bfloat16().view(6, 6, 16)[:, :3]
    cos, sin = torch.randn(2, 6, 16).bfloat16()
    assert torch.equal(ops.rope(q, cos, sin), eager_rope(q, cos, sin))


def test_fused_ops_reject_bad_input(ops):
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        ops.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        ops.rms_norm(torch.randn(2, 8).bfloat16(), torch.randn(4).bfloat16(), 1e-5)
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        ops.silu_mul(torch.randn(2, 7).bfloat16())
    with pytest.raises(ValueError, match="cos/sin must be"):
        ops.rope(torch.randn(3, 2, 8).bfloat16(), torch.randn(3, 4).bfloat16(), torch.randn(3, 4).bfloat16())
    with pytest.raises(TypeError, match="must be bfloat16"):
        ops.first_max(torch.randn(2, 8))
    with pytest.raises(ValueError, match="rows, V > 0"):
        ops.first_max(torch.randn(2, 0).bfloat16())


def test_layers_use_fused_ops_for_bf16_and_eager_for_fp32(ops):
    """The layer functions route bf16 through the kernels (same values as eager) and keep fp32 eager."""
    assert fused_ops(torch.zeros(2, dtype=torch.bfloat16)) is ops
    assert fused_ops(torch.zeros(2)) is None
    x = torch.randn(5, 32)
    w = torch.randn(32)
    rope = RotaryEmbedding(type("C", (), {"rope_parameters": {"rope_theta": 10000.0}})(), 16)
    q = torch.randn(5, 2, 16)
    pos = torch.arange(5)
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd, qd = x.to(dtype), w.to(dtype), q.to(dtype)
        got, want = rms_norm(xd, wd, 1e-5), eager_rms_norm(xd, wd, 1e-5)
        if dtype == torch.float32:
            assert torch.equal(got, want)           # eager itself
        else:
            assert_equal_but_rare_ulp(got, want, dtype)
        cos, sin = rope.cos_sin(pos, dtype)
        assert torch.equal(rope.apply(qd, cos, sin), eager_rope(qd, cos, sin))


def test_bf16_rounding_keeps_subnormals(ops):
    """bf16 results below 2^-126 round as c10's cast does (the one-instruction conversion reads fp32
    subnormals as zero; simd.h sends such vectors down the exact sequence): RoPE bit for bit, and
    RMSNorm of a row of tiny values beside one large one."""
    tiny = torch.tensor([5e-40, -3e-39, 1e-38, 2e-45]).bfloat16()
    x = tiny.repeat(64, 8, 4)                     # [64, 8, 16]: every vector holds subnormals
    cos, sin = torch.full((64, 16), 0.75).bfloat16(), torch.full((64, 16), 0.5).bfloat16()
    got = ops.rope(x, cos, sin)
    want = eager_rope(x, cos, sin)
    assert torch.equal(got, want) and (want != 0).any()
    row = torch.full((4, 128), 5e-40).bfloat16()
    row[:, 0] = 1.0
    w = torch.ones(128).bfloat16()
    got, want = ops.rms_norm(row, w, 1e-6), eager_rms_norm(row, w, 1e-6)
    assert torch.equal(got, want) and (want[:, 1:] != 0).all()
