"""Batched sampling (moegen.engine.sampler): every sampled row filtered and drawn at once where the
logits are, each row's uniform from its own sequence's generator."""
from types import SimpleNamespace

import torch

from moegen.engine.params import SamplingParams
from moegen.engine.sampler import Sampler, filter_rows


def one_row_reference(logits, p):
    """The per-row filter as the sampler applied it before (temperature, top-k by the k-th value, top-p)."""
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel()))[0][-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= p.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def test_rows_are_filtered_each_by_its_own_settings():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=20),
              SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0.5, top_k=7, top_p=0.5),
              SamplingParams(temperature=2.0, top_k=1)]
    got = filter_rows(logits, params)
    for row, p, want in zip(got, params, [one_row_reference(r, p) for r, p in zip(logits, params)]):
        assert torch.equal(torch.isinf(row), torch.isinf(want))
        torch.testing.assert_close(row[~torch.isinf(row)], want[~torch.isinf(want)])
    assert int((~torch.isinf(got[4])).sum()) == 1


def seqs_with(params, n, first_seed=0):
    return [SimpleNamespace(key=(i, 0), seed=first_seed + i, params=params) for i in range(n)]


def test_draws_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.7, 1e-9]))
    n = 6000
    drawn = Sampler().draw(logits.repeat(n, 1), seqs_with(SamplingParams(temperature=1.0, top_k=3), n))
    freq = torch.bincount(drawn, minlength=4).double() / n
    assert freq[3] == 0                                    # filtered out: never drawn
    torch.testing.assert_close(freq[:3], torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64), atol=0.025, rtol=0)


def test_a_seeded_row_draws_the_same_token_whatever_else_is_in_the_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 50, generator=g)
    params = SamplingParams(temperature=1.0, seed=3)
    together = Sampler().draw(logits, seqs_with(params, 8))
    alone = [int(Sampler().draw(logits[i:i + 1], seqs_with(params, i + 1)[i:])[0]) for i in range(8)]
    assert together.tolist() == alone
    assert len(set(together.tolist())) > 1
