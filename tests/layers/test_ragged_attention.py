"""Prefill attention over a flat batch: consecutive prompts of one length attend in one SDPA call,
with exactly the values of one call per prompt."""
import pytest
import torch

from moegen.layers import attention
from moegen.layers.attention import RaggedContext, causal_attention, equal_length_runs


def test_runs_group_consecutive_prompts_of_one_length():
    assert equal_length_runs([4, 4, 4, 2, 4, 4, 1]) == [(0, 4, 3), (12, 2, 1), (14, 4, 2), (22, 1, 1)]
    assert equal_length_runs([5]) == [(0, 5, 1)]
    assert equal_length_runs([4, 4, 2], group=False) == [(0, 4, 1), (4, 4, 1), (8, 2, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 16])
def test_batched_runs_equal_one_call_per_prompt(dtype, window, monkeypatch):
    # the SDPA path (bf16 with AMX or AVX-512 BF16 takes the native kernel: tests/layers/test_prefill_attention.py)
    monkeypatch.setattr(attention, "prefill_attention", lambda *args: None)
    g = torch.Generator().manual_seed(3)
    lens = [40] * 5 + [7, 7, 30, 40, 40, 1]
    heads, kv_heads, dim = 8, 2, 32
    tokens = sum(lens)
    # q, k and v as the engine has them: views of one projection's output
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    got = RaggedContext(lens).attend(0, q, k, v, 0.1, window)
    want, start = [], 0
    for n in lens:
        want.append(causal_attention(q[start:start + n], k[start:start + n], v[start:start + n], 0.1, window))
        start += n
    assert torch.equal(got, torch.cat(want))
