"""Prefix caching and n samples per prompt, float32 on every architecture: the same tokens and
log-likelihoods with sharing on and off (and as transformers where it decides), through the
native and the PyTorch attention paths; prefixes ending inside a block, sharers admitted at
different steps, eviction under a tiny budget, forked samples against the same request alone,
the hit rate in the stats, and the planner's term for the saved prefill."""
import json
import shutil

import pytest
import torch

from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.engine.kv_cache import kv_bytes_per_token
from moegen.checkpoints.fixture import ARCHS, fixture_config
from moegen.loader import load_model
from moegen.planner.cost_model import JobShape, predict
from moegen.planner.hardware import Hardware
from moegen.planner.model_spec import ModelSpec
from moegen.planner.plan import Plan
from moegen.planner.search import search
from tests.hf_reference import hf_greedy, hf_logits

BLOCK = 16
FIXED = dict(max_batch=8, attn_micro_batch=0, max_prefill_tokens=1024)   # no planning: fast, deterministic
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PREFIX = tokens(0, 37)                  # ends inside the third block
PROMPTS = [
    PREFIX + tokens(1, 5),              # shares two full blocks with the next ones
    PREFIX + tokens(2, 11),
    PREFIX[:20] + tokens(3, 9),         # shares one block
    PREFIX + tokens(1, 5),              # the first again: all but its last block
    PREFIX[:32],                        # two whole blocks: its last is recomputed, not written shared
    tokens(4, 14),                      # shorter than a block: shares nothing
]


def engines(path, **kw):
    """(sharing on, sharing off) over one float32 model."""
    model = load_model(path, "float32")
    settings = {"kv_cache_bytes": 32 << 20, **FIXED, **kw}
    return (Engine(model, None, EngineConfig(prefix_caching=True, **settings)),
            Engine(model, None, EngineConfig(prefix_caching=False, **settings)))


def token_ids(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("native", ["1", "0"], ids=["native", "torch"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_with_sharing_on_and_off(arch, native, tiny_fixture, monkeypatch):
    monkeypatch.setenv("MOEGEN_NATIVE", native)
    on, off = engines(tiny_fixture(arch))
    shared = on.generate(PROMPTS, GREEDY)
    assert token_ids(shared) == token_ids(off.generate(PROMPTS, GREEDY))
    assert on.stats.prompt_tokens_computed < on.stats.prefill_tokens == off.stats.prompt_tokens_computed


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2"])
def test_shared_prefixes_give_transformers_tokens(arch, tiny_fixture):
    path = tiny_fixture(arch)
    on, _ = engines(path)
    assert token_ids(on.generate(PROMPTS, GREEDY)) == [hf_greedy(path, p, GREEDY.max_new_tokens) for p in PROMPTS]


def test_sliding_window_tails_see_only_their_window(tiny_fixture, tmp_path):
    """A window (12) shorter than the shared prefix: a tail's queries must drop old cached keys."""
    path = tmp_path / "mixtral-window"
    shutil.copytree(tiny_fixture("mixtral"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "sliding_window": 12}))
    on, off = engines(path)
    ours = token_ids(on.generate(PROMPTS[:4], GREEDY))
    assert ours == token_ids(off.generate(PROMPTS[:4], GREEDY))
    assert ours == [hf_greedy(path, p, GREEDY.max_new_tokens) for p in PROMPTS[:4]]
    assert on.stats.prefix_hit_rate > 0


def test_sharers_admitted_at_different_steps_reuse_the_first_ones_blocks(tiny_fixture):
    on, off = engines(tiny_fixture("qwen3_moe"), max_batch=1)     # one sequence per step
    prompts = [PREFIX + tokens(10 + i, 3 + i) for i in range(4)]
    assert token_ids(on.generate(prompts, GREEDY)) == token_ids(off.generate(prompts, GREEDY))
    assert on.stats.prefill_steps == 4
    # the first computes everything; each later one reuses the two full prefix blocks
    assert on.stats.prompt_tokens_computed == sum(map(len, prompts)) - 3 * 2 * BLOCK


def test_eviction_under_a_tiny_budget_keeps_results_exact(tiny_fixture):
    model = load_model(tiny_fixture("olmoe"), "float32")
    four_blocks = 4 * BLOCK * kv_bytes_per_token(model, model.dtype)
    settings = dict(kv_cache_bytes=four_blocks, max_batch=1, attn_micro_batch=0, max_prefill_tokens=1024)
    on = Engine(model, None, EngineConfig(**settings))
    off = Engine(model, None, EngineConfig(prefix_caching=False, **settings))
    # 40-token prompts + 6 new = 3 blocks each. A leaves its two prefix blocks cached; B needs a
    # third block besides the two free ones and evicts A's deeper one (released first)
    first, again = [PREFIX + [7, 8, 9], tokens(5, 37) + [7, 8, 9]], [PREFIX + [10, 11, 12]]
    assert token_ids(on.generate(first, GREEDY)) == token_ids(off.generate(first, GREEDY))
    assert on.blocks.num_blocks == 4 and on.blocks.evictions == 1
    on.reset_stats()
    assert token_ids(on.generate(again, GREEDY)) == token_ids(off.generate(again, GREEDY))
    assert on.stats.prompt_tokens_computed == 40 - BLOCK      # only A's first block was left


MC_CONTEXTS = [PREFIX, PREFIX[:21], tokens(6, 50)]
MC_CHOICES = [[11], [12, 13], [14, 15, 16], [17]]


def mc_requests():
    """Multiple choice: every context with four continuations (contexts end inside a block)."""
    return [(ctx, choice) for ctx in MC_CONTEXTS for choice in MC_CHOICES]


@pytest.mark.parametrize("arch", ARCHS)
def test_loglikelihoods_equal_with_sharing_on_and_off(arch, tiny_fixture):
    on, off = engines(tiny_fixture(arch), max_batch=5)     # a context's choices span two passes
    requests = mc_requests()
    shared, plain = on.loglikelihood(requests), off.loglikelihood(requests)
    assert [g for _, g in shared] == [g for _, g in plain]
    assert max(abs(a - b) for (a, _), (b, _) in zip(shared, plain)) < 1e-5
    asked = sum(len(c) + len(k) - 1 for c, k in requests)
    assert on.stats.prefill_tokens == asked and on.stats.prompt_tokens_computed < asked / 2


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_shared_context_loglikelihoods_match_transformers(arch, tiny_fixture):
    path = tiny_fixture(arch)
    on, _ = engines(path)
    for (ctx, cont), (logprob, greedy) in zip(mc_requests(), on.loglikelihood(mc_requests())):
        lp = torch.log_softmax(hf_logits(path, ctx + cont)[len(ctx) - 1:-1].double(), -1)
        assert abs(logprob - lp.gather(1, torch.tensor(cont)[:, None]).sum().item()) < 1e-4
        assert greedy == bool((lp.argmax(-1) == torch.tensor(cont)).all())


def test_scoring_is_admitted_by_the_generation_scheduler(tiny_fixture):
    """One scheduler for both: a loglikelihood call reuses the prefix blocks a generate call left
    cached, and its passes and sequences are counted as generation's are."""
    on, off = engines(tiny_fixture("qwen3_moe"), max_batch=2)
    # leaves PREFIX's two full blocks cached, in a cache (8 blocks) that the scoring call keeps
    on.generate([PREFIX + tokens(20, 3), tokens(23, 60)], GREEDY)
    on.reset_stats()
    requests = [(PREFIX + [5], [6, 7]), (tokens(21, 20), [8]), (tokens(22, 5), [9, 10, 11])]
    shared = on.loglikelihood(requests)
    assert max(abs(a - b) for (a, _), (b, _) in zip(shared, off.loglikelihood(requests))) < 1e-5
    rec = on.stats.record()
    assert rec.prompt_lens == (39, 20, 7) and rec.gen_lens == (0, 0, 0)      # input order, nothing generated
    assert rec.prompt_cached_lens == (2 * BLOCK, 0, 0)                        # the generated call's blocks
    assert rec.prefill_pass_tokens == (39 - 2 * BLOCK + 20, 7) and rec.decode_step_seqs == ()   # max_batch 2


SAMPLED = dict(max_new_tokens=8, temperature=0.9, top_p=0.95, ignore_eos=True)


@pytest.mark.parametrize("caching", [True, False], ids=["caching", "no-caching"])
@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v2"])
def test_each_of_n_samples_equals_its_request_alone_with_its_seed(arch, caching, tiny_fixture):
    on, off = engines(tiny_fixture(arch))
    engine = on if caching else off
    prompts = [PREFIX, tokens(9, 32)]    # a partial last block (copied into each fork) and none
    n, seed = 4, 11
    outs = engine.generate(prompts, SamplingParams(n=n, seed=seed, **SAMPLED))
    assert engine.stats.prompt_tokens_computed == sum(map(len, prompts))   # one prefill per prompt
    assert engine.stats.prefill_tokens == n * sum(map(len, prompts))
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        assert [s.sample for s in out.samples] == list(range(n)) and out.token_ids == out.samples[0].token_ids
        alone = [off.generate([prompt], SamplingParams(seed=seed + i * n + j, **SAMPLED))[0].token_ids
                 for j in range(n)]
        assert [s.token_ids for s in out.samples] == alone
        assert len({tuple(t) for t in alone}) > 1                  # the samples differ


def test_rows_carry_every_sample_and_stay_as_they_were_for_one(tiny_fixture):
    on, _ = engines(tiny_fixture("mixtral"))
    (one,) = on.generate([PREFIX], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert one.samples == [] and set(one.to_row()) == {"index", "prompt_token_ids", "token_ids", "text",
                                                        "finish_reason"}
    (three,) = on.generate([PREFIX], SamplingParams(n=3, seed=1, **SAMPLED))
    row = three.to_row()
    assert [s["sample"] for s in row["samples"]] == [0, 1, 2]
    assert row["token_ids"] == row["samples"][0]["token_ids"] and set(row["samples"][1]) == {
        "sample", "token_ids", "text", "finish_reason"}


def test_hit_rate_counts_the_reused_tokens(tiny_fixture):
    on, _ = engines(tiny_fixture("mixtral"))
    a = tokens(7, 40)
    b = a[:36] + tokens(8, 4)           # shares 36 tokens, two whole blocks of them
    on.generate([a, b], GREEDY)         # admitted together: b shares blocks a computes in that pass
    rec = on.stats.record()
    assert rec.prompt_tokens == 80 and rec.prompt_tokens_computed == 80 - 32
    assert rec.prefill_pass_tokens == (48,) and on.stats.prefix_hit_rate == pytest.approx(0.4)


def test_prefix_caching_is_an_engine_option():
    from moegen.engine.options import config_of
    assert EngineConfig().prefix_caching is True
    assert config_of({"prefix_caching": "false"}).prefix_caching is False


# --- the planner's term --------------------------------------------------------------------------

CPU = Hardware(device="cpu", gemm_flops_per_s={"bfloat16": 1e12}, host_mem_bw_gbps=50, cpu_attention_gbps=20,
               host_memory_bytes=64 << 30)


def test_planner_prices_only_the_computed_prompt_tokens():
    spec = ModelSpec.from_config(fixture_config("mixtral", "bench"))
    plan = Plan(device="cpu", max_batch=256, attn_micro_batch=256, max_prefill_tokens=4096)
    whole, shared = JobShape(800, 64, 256), JobShape(800, 64, 256, computed_prompt_len=100)
    assert shared.prefill_len == 100 and shared.kv_tokens == 164
    a, b = predict(spec, CPU, plan, whole), predict(spec, CPU, plan, shared)
    # the budget counts computed tokens: 40 prompts a pass instead of 5
    assert (b.prefill_passes, a.prefill_passes) == (7, 52)
    assert b.prefill_s < a.prefill_s / 4 and b.decode_s == pytest.approx(a.decode_s)
    assert JobShape.from_lengths([800] * 4, 64, "bfloat16", computed_tokens=1000).computed_prompt_len == 250


def test_planner_fits_more_sequences_when_blocks_are_shared():
    spec = ModelSpec.from_config(fixture_config("mixtral", "bench"))
    per_seq = spec.kv_bytes_per_token(2) * (800 + 64)
    kv = 40 * per_seq                   # 40 unshared sequences of 864 tokens
    whole, _ = search(spec, CPU, JobShape(800, 64, 512), overrides={"kv_cache_bytes": kv})
    shared, _ = search(spec, CPU, JobShape(800, 64, 512, computed_prompt_len=100), overrides={"kv_cache_bytes": kv})
    assert whole.max_batch <= 40 < shared.max_batch
    assert shared.max_prefill_tokens % 100 == 0


def test_generate_rows_carry_every_sample_with_n(tmp_path, tiny_fixture):
    from moegen.cli import main
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in (PREFIX, PROMPTS[1])))
    code = main(["generate", "--model", str(tiny_fixture("mixtral")), "--input", str(src), "--out", str(out),
                 "--max-new-tokens", "4", "--dtype", "float32", "--quiet", "--kv-cache-memory", "16MB", "--ignore-eos",
                 "--n", "3", "--temperature", "0.9", "--seed", "5", "--max-batch", "8", "--attn-micro-batch", "0",
                 "--max-prefill-tokens", "512"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and [r["index"] for r in rows] == [0, 1]
    for row in rows:
        assert [s["sample"] for s in row["samples"]] == [0, 1, 2] and row["token_ids"] == row["samples"][0]["token_ids"]
        assert all(len(s["token_ids"]) == 4 for s in row["samples"])
