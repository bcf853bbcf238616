"""Decode's device <-> host traffic (moegen.engine.transfers) and device-side decode attention,
checked on the CPU: a stand-in pinned allocator routes every q, K/V and output through the staging
buffers in the order a GPU engine uses them, and the gathered kernels equal the CPU kernels."""
import pytest
import torch

from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.engine.transfers import HostStaging
from moegen.loader import load_model
from moegen.ops.attention import (gathered_decode_attention, gathered_decode_attention_mla,
                                  paged_decode_attention_mla_torch, paged_decode_attention_torch)
from tests.engine.test_stream_memory import FakePinned


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2"])
def test_staged_decode_transfers_give_the_same_tokens_and_reuse_their_buffers(arch, tiny_fixture, monkeypatch):
    import moegen.engine.kv_cache as kv_cache
    prompts = [[1, 5, 9, 2], [1, 7], [1, 3, 3, 8, 4, 6], [1, 2, 2], [1, 9]]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    cfg = dict(streaming="staged", kv_cache_bytes=8 << 20, max_batch=5, attn_micro_batch=2)
    ref = Engine(load_model(tiny_fixture(arch), "float32"), None, EngineConfig(**cfg)).generate(prompts, params)

    engine = Engine(load_model(tiny_fixture(arch), "float32"), None, EngineConfig(**cfg))
    pinned = FakePinned()
    engine.runner.staging = HostStaging("cpu", alloc=pinned)
    seen = []
    for name in ("paged_decode_attention", "paged_decode_attention_mla"):
        kernel = getattr(kv_cache, name)
        monkeypatch.setattr(kv_cache, name, lambda q, *a, k=kernel: seen.append((q.shape[0], pinned.owns(q))) or k(q, *a))
    out = engine.generate(prompts, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    assert seen and all(staged for _, staged in seen)             # every query came through a staging buffer
    assert {n for n, _ in seen} == {2, 1}                           # in micro-batches of 2 (5 = 2 + 2 + 1)
    # one buffer per tensor kind, grown a few times at most: none per layer or step
    assert len(pinned.slabs) <= 2 * len(engine.runner.staging.buffers)


def _cache_case(seed=0, mla=False):
    g = torch.Generator().manual_seed(seed)
    blocks, bs, s = 20, 4, 5
    lens = torch.tensor([1, 4, 9, 13, 6], dtype=torch.int32)
    tables = torch.randperm(blocks, generator=g).view(s, 4).to(torch.int32)     # each sequence its own blocks
    if mla:
        return torch.randn(s, 4, 10, generator=g), torch.randn(blocks, bs, 10, generator=g), tables, lens
    return (torch.randn(s, 4, 8, generator=g), torch.randn(blocks, bs, 2, 8, generator=g),
            torch.randn(blocks, bs, 2, 8, generator=g), tables, lens)


@pytest.mark.parametrize("window", [0, 3])
def test_gathered_decode_attention_equals_the_paged_kernel(window):
    q, k, v, tables, lens = _cache_case()
    k[tables[0, 1]] = float("nan")      # a block past sequence 0's context: must not leak in
    want = paged_decode_attention_torch(q, k, v, tables, lens, 0.35, window)
    got = gathered_decode_attention(q, k, v, tables, lens, 0.35, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gathered_mla_decode_attention_equals_the_paged_kernel():
    q, kv, tables, lens = _cache_case(1, mla=True)
    want = paged_decode_attention_mla_torch(q, kv, tables, lens, 0.3, 6)
    torch.testing.assert_close(gathered_decode_attention_mla(q, kv, tables, lens, 0.3, 6), want, rtol=1e-5, atol=1e-6)
