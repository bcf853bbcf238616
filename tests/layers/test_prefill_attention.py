"""The native prefill attention kernel (csrc/prefill_attention.cpp, bf16 on CPUs with AMX or
AVX-512 BF16; each ISA this CPU has, forced in turn) against SDPA: its error from the float32 result
is SDPA-in-bf16's own, for ragged batches, GQA, MLA's head sizes, sliding windows and inputs that
are views of one projection."""
import pytest
import torch

from moegen.layers.attention import RaggedContext, causal_attention
from moegen.ops import prefill_attention as pa

needs_kernel = pytest.mark.skipif(pa._kernel() is None, reason="no AMX-BF16 or AVX-512 BF16 on this CPU (or no "
                                  "native build): the kernel is not used here")
ISAS = pa.available_isas()


def _inputs(lens, heads, kv_heads, dim, dv, seed=0):
    """q, k, v as the engine has them: views of one projection's output."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(lens)
    qkv = torch.randn(tokens, heads * dim + kv_heads * (dim + dv), generator=g).bfloat16()
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dv], -1)
    return q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dv)


def _per_prompt(q, k, v, lens, scale, window):
    outs, start = [], 0
    for n in lens:
        sl = slice(start, start + n)
        outs.append(causal_attention(q[sl], k[sl], v[sl], scale, window))
        start += n
    return torch.cat(outs)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS or ["none"])
@pytest.mark.parametrize("lens,heads,kv_heads,dim,dv,window", [
    ([128] * 6, 16, 4, 64, 64, 0),                 # Mixtral's heads, prompts of one length
    ([1, 5, 31, 32, 33, 100, 300], 8, 2, 128, 128, 0),  # ragged, not multiples of the 32-row block
    ([200, 77, 64], 4, 4, 64, 64, 50),             # sliding window, no GQA
    ([40, 90], 6, 6, 192, 128, 0),                 # MLA's expanded heads: q/k 192, v 128
    ([513], 16, 1, 96, 64, 0),                     # MQA, one long prompt
])
def test_kernel_error_is_sdpa_bf16_error(lens, heads, kv_heads, dim, dv, window, isa):
    q, k, v = _inputs(lens, heads, kv_heads, dim, dv)
    scale = dim ** -0.5
    got = pa.prefill_attention(q, k, v, lens, scale, window, isa=isa)
    assert got is not None and got.shape == (sum(lens), heads, dv) and got.dtype == torch.bfloat16
    exact = _per_prompt(q.float(), k.float(), v.float(), lens, scale, window)
    sdpa = _per_prompt(q, k, v, lens, scale, window)
    err = (got.float() - exact).abs()
    sdpa_err = (sdpa.float() - exact).abs()
    # bf16 output rounding dominates both: about the same worst case and mean (the kernel also
    # rounds the probabilities to bf16; SDPA keeps them in fp32 where q and v head sizes differ)
    assert err.max() <= 2 * sdpa_err.max()
    assert err.mean() <= 1.5 * sdpa_err.mean()
    # a query sees no later key: changing the last token of each prompt leaves the others' rows
    k2, v2 = k.clone(), v.clone()
    ends = torch.tensor(lens).cumsum(0) - 1
    k2[ends] += 3
    v2[ends] -= 3
    again = pa.prefill_attention(q, k2, v2, lens, scale, window, isa=isa)
    keep = torch.ones(sum(lens), dtype=torch.bool)
    keep[ends] = False
    assert torch.equal(again[keep], got[keep]) and not torch.equal(again[~keep], got[~keep])


@needs_kernel
def test_ragged_context_takes_the_kernel_for_bf16_only():
    lens = [64, 64, 17]
    q, k, v = _inputs(lens, 8, 2, 64, 64, seed=1)
    got = RaggedContext(lens).attend(0, q, k, v, 0.125)
    assert torch.equal(got, pa.prefill_attention(q, k, v, lens, 0.125))
    q32, k32, v32 = q.float(), k.float(), v.float()   # float32: SDPA, exact against transformers
    assert pa.prefill_attention(q32, k32, v32, lens, 0.125) is None
    assert torch.equal(RaggedContext(lens).attend(0, q32, k32, v32, 0.125), _per_prompt(q32, k32, v32, lens, 0.125, 0))


def test_shapes_the_kernel_does_not_take_fall_back():
    q, k, v = _inputs([10], 4, 2, 80, 80)          # head size not a multiple of 32
    assert pa.prefill_attention(q, k, v, [10], 0.1) is None
    q, k, v = _inputs([10], 6, 4, 64, 64)          # query heads not a multiple of kv heads
    assert pa.prefill_attention(q, k, v, [10], 0.1) is None


@needs_kernel
def test_bad_lengths_are_refused():
    q, k, v = _inputs([10, 6], 4, 2, 64, 64)
    with pytest.raises(RuntimeError, match="seq_lens sum to 15"):
        pa._kernel().prefill_attention(q, k, v, [10, 5], 0.1, 0)
    with pytest.raises(RuntimeError, match="positive"):
        pa._kernel().prefill_attention(q, k, v, [16, 0], 0.1, 0)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS or ["none"])
def test_nan_scores_make_their_row_nan(isa):
    lens = [40, 40]
    q, k, v = _inputs(lens, 4, 2, 64, 64, seed=2)
    q = q.clone()
    q[10, 1, 3] = float("nan")                   # prompt 0, query 10, head 1
    got = pa.prefill_attention(q, k, v, lens, 0.125, isa=isa)
    assert got[10, 1].isnan().all()
    assert not got[:10].isnan().any() and not got[40:].isnan().any()   # earlier rows, the other prompt


@needs_kernel
def test_what_the_kernel_cannot_take_goes_to_sdpa():
    q, k, v = _inputs([5, 3], 4, 2, 64, 64)
    assert pa.prefill_attention(q, k, v, [5, 0, 3], 0.1) is None     # an empty prompt
    assert pa.prefill_attention(q, k, v, [5, 3], -0.1) is None       # a negative scale
    assert pa.prefill_attention(q, k, v, [4, 3], 0.1) is None        # lengths that miss tokens
    got = RaggedContext([5, 0, 3]).attend(0, q, k, v, 0.1)
    assert torch.equal(got, _per_prompt(q, k, v, [5, 3], 0.1, 0))
    with pytest.raises(RuntimeError, match="scale must be positive"):
        pa._kernel().prefill_attention(q, k, v, [5, 3], -0.1, 0)


@needs_kernel
def test_the_isas_agree_and_an_unknown_one_is_refused():
    """Every ISA here gives the same rounding within fp32 summation order: outputs within one bf16 step."""
    lens = [70, 33]
    q, k, v = _inputs(lens, 8, 2, 64, 64, seed=3)
    outs = [pa.prefill_attention(q, k, v, lens, 0.125, isa=isa) for isa in ISAS]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-2, atol=1e-2)
    assert ISAS[-1] == "avx512-bf16" and ("amx" in ISAS) == (ISAS[0] == "amx")
    with pytest.raises(ValueError, match="'sse' is not available"):
        pa.prefill_attention(q, k, v, lens, 0.125, isa="sse")
