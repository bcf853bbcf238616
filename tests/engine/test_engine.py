"""The engine against transformers: greedy tokens, log-likelihoods; sampling; stops; bad input."""
import pytest
import torch

from moegen.engine import Engine, EngineConfig, SamplingParams
from moegen.errors import CapacityError, InputError
from moegen.checkpoints.fixture import ARCHS
from moegen.loader import load_model
from moegen.planner.plan import Plan, PlanError
from moegen.planner.policy import FALLBACK_SETTINGS
from moegen.tokenizer import load_tokenizer
from tests.hf_reference import gsm8k_questions, hf_greedy, hf_logits

NEW_TOKENS = 32
CONFIGS = {  # global batch smaller than the prompt count; attention micro-batches of 1, 3 and all
    "G3-A1": dict(max_batch=3, attn_micro_batch=1),
    "G8-A3": dict(max_batch=8, attn_micro_batch=3),
    "Gall-Aall-staged": dict(attn_micro_batch=0, streaming="staged", num_buffers=3),
}


def make_engine(path, dtype="float32", **kw):
    return Engine(load_model(path, dtype), load_tokenizer(path), EngineConfig(kv_cache_bytes=32 << 20, **kw))


@pytest.fixture(scope="module")
def questions(gsm8k_dir):
    return gsm8k_questions(gsm8k_dir, 8)


@pytest.fixture(scope="module")
def references(tiny_fixture, questions):
    """arch -> (prompt ids, transformers' greedy continuation) per question."""
    cache = {}

    def get(arch):
        if arch not in cache:
            path = tiny_fixture(arch)
            tok = load_tokenizer(path)
            prompts = [tok.encode(q) for q in questions]
            cache[arch] = prompts, [hf_greedy(path, p, NEW_TOKENS) for p in prompts]
        return cache[arch]
    return get


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_transformers(arch, config, tiny_fixture, references):
    prompts, refs = references(arch)
    assert len({len(p) for p in prompts}) > 4      # ragged
    engine = make_engine(tiny_fixture(arch), **CONFIGS[config])
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.token_ids for o in outs] == refs
    assert [o.index for o in outs] == list(range(len(prompts)))
    assert all(o.finish_reason == "length" for o in outs)
    if config.startswith("G3"):
        assert engine.stats.prefill_steps >= 3     # the global batch really was refilled


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_loglikelihood_matches_transformers(arch, tiny_fixture, questions):
    path = tiny_fixture(arch)
    tok = load_tokenizer(path)
    requests = [(tok.encode(q)[:20], tok.encode(q, add_bos=False)[20:20 + k]) for q, k in zip(questions, (1, 3, 5, 8))]
    ours = make_engine(path, attn_micro_batch=2).loglikelihood(requests)
    for (ctx, cont), (logprob, greedy) in zip(requests, ours):
        lp = torch.log_softmax(hf_logits(path, ctx + cont)[len(ctx) - 1:-1].double(), -1)
        ref = lp.gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert abs(logprob - ref) < 1e-4
        assert greedy == bool((lp.argmax(-1) == torch.tensor(cont)).all())


def test_loglikelihood_greedy_flag_true_for_greedy_continuation(tiny_fixture):
    path = tiny_fixture("qwen3_moe")
    engine = make_engine(path)
    ctx = [1, 415, 2936, 9060]
    cont = engine.generate([ctx], SamplingParams(max_new_tokens=4, ignore_eos=True))[0].token_ids
    (_, greedy), = engine.loglikelihood([(ctx, cont)])
    assert greedy


def test_seeded_sampling_is_reproducible(tiny_fixture):
    path = tiny_fixture("olmoe")
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    prompts = ["Natalia sold clips", "Weng earns"]
    a = make_engine(path).generate(prompts, params)
    b = make_engine(path, max_batch=1).generate(prompts, params)   # other batch composition
    c = make_engine(path).generate(prompts, SamplingParams(**{**params.__dict__, "seed": 7}))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_finish_reasons_and_stops(tiny_fixture):
    path = tiny_fixture("mixtral")
    engine = make_engine(path)
    prompt = [1, 415, 2936, 9060]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    # a stop id at the 5th generated token ends the sequence there
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first + 1]
    # a stop string taken from the free text cuts the text before it
    text = free.text
    start = next(i for i in range(len(text) // 2, len(text)) if not text[i].isspace())
    stop = text[start:start + 3]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == text[:text.find(stop)]


def test_eos_ends_sequence_unless_ignored(tiny_fixture):
    path = tiny_fixture("mixtral")
    engine = make_engine(path)
    prompt = [1, 415, 2936, 9060]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    engine.tokenizer.eos_token_ids = (free.token_ids[2],)   # pretend the third token is EOS
    stopped = engine.generate([prompt], SamplingParams(max_new_tokens=6))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:free.token_ids.index(free.token_ids[2]) + 1]


def test_bad_prompts_are_named(tiny_fixture):
    engine = make_engine(tiny_fixture("mixtral"), max_model_len=64)
    with pytest.raises(InputError, match="prompt 1 is empty"):
        engine.generate(["hello", []], SamplingParams(max_new_tokens=4))
    with pytest.raises(InputError, match="prompt 0 has 70 tokens"):
        engine.generate([[5] * 70], SamplingParams(max_new_tokens=4))
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.generate([[5, 999999]], SamplingParams(max_new_tokens=4))
    out = engine.generate([[5] * 70], SamplingParams(max_new_tokens=4, ignore_eos=True), truncate="left")[0]
    assert len(out.prompt_token_ids) == 60
    with pytest.raises(InputError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_stats_account_for_every_pass_of_generation_and_scoring(tiny_fixture):
    engine = make_engine(tiny_fixture("mixtral"), max_batch=2, attn_micro_batch=0, max_prefill_tokens=64)
    engine.generate([[1, 2, 3], [1, 2, 3, 4, 5]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.loglikelihood([([1, 2], [3, 4])])          # scores [1, 2, 3] in one more prefill pass
    rec = engine.stats.record(wall_s=1.0)
    assert rec.prompt_lens == (3, 5, 3) and rec.gen_lens == (4, 4, 0)
    assert rec.prefill_pass_tokens == (8, 3) and rec.decode_step_seqs == (2, 2, 2)
    assert (engine.stats.prefill_tokens, engine.stats.decode_tokens) == (11, 6)
    assert (engine.stats.prefill_steps, engine.stats.decode_steps) == (2, 3)


def test_a_sequence_larger_than_the_kv_budget_says_what_to_raise(tiny_fixture):
    from moegen.engine.kv_cache import kv_bytes_per_token
    model = load_model(tiny_fixture("mixtral"), "float32")
    one_block = 16 * kv_bytes_per_token(model, model.dtype)
    config = EngineConfig(kv_cache_bytes=one_block, max_batch=1, attn_micro_batch=0, max_prefill_tokens=64)
    engine = Engine(model, None, config)
    with pytest.raises(CapacityError, match="kv-cache-memory"):          # one block holds 16 tokens, not 23
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=20, ignore_eos=True))
    with pytest.raises(CapacityError, match="holds no block.*kv-cache-memory"):   # less than a block: refused at once
        Engine(model, None, EngineConfig(kv_cache_bytes=one_block - 1))


def test_kv_blocks_are_returned(tiny_fixture):
    engine = make_engine(tiny_fixture("qwen2_moe"), max_batch=2)
    engine.generate([[1, 2, 3]] * 5, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_kv_cache_grows_only_as_far_as_calls_need(tiny_fixture):
    engine = make_engine(tiny_fixture("mixtral"))
    engine.generate([[1, 2, 3]] * 4, SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert engine.blocks.num_blocks == 4 * 2           # 23 tokens = 2 blocks of 16 each
    assert engine.max_blocks > 100                     # far below the 32 MiB budget
    engine.generate([[1, 2, 3]] * 6, SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert engine.blocks.num_blocks == 12


def test_bfloat16_stays_close_to_transformers_bfloat16(tiny_fixture, questions):
    """bf16 cannot match token for token on random weights; logits stay within a documented
    tolerance (2% of the logit scale) of transformers' bf16 logits on the same prompts."""
    path = tiny_fixture("mixtral")
    tok = load_tokenizer(path)
    seqs = [tok.encode(q)[:24] for q in questions[:4]]
    ours = load_model(path, "bfloat16").forward(seqs)
    for seq, logits in zip(seqs, ours):
        ref = hf_logits(path, seq, torch.bfloat16)
        assert (logits.float() - ref).abs().max() <= 0.02 * ref.abs().max()


def test_planner_fills_unset_settings_and_overrides_win(tiny_fixture):
    path = tiny_fixture("mixtral")
    planned = make_engine(path)
    settings = planned.settings([12] * 20, 8)
    plan, prediction = planned.stats.plan.plan, planned.stats.plan.prediction
    assert settings == {"max_batch": plan.max_batch, "attn_micro_batch": plan.attn_micro_batch,
                        "max_prefill_tokens": plan.max_prefill_tokens}
    assert prediction.e2e_tokens_per_s > 0
    fixed = make_engine(path, max_batch=3, attn_micro_batch=1)
    s = fixed.settings([12] * 20, 8)
    assert s["max_batch"] == 3 and s["attn_micro_batch"] == 1 and fixed.runner.attn_micro_batch == 1


class FixedPlanner:
    """A planner that always returns one plan, and records what the engine asked of it."""
    def __init__(self, error=None):
        self.calls, self.error = [], error

    def plan(self, model_config, job, overrides):
        self.calls.append((job, overrides))
        if self.error:
            raise self.error
        return Plan(max_batch=5, attn_micro_batch=2, max_prefill_tokens=40), "its prediction"


def test_engine_runs_the_injected_planners_plan(tiny_fixture):
    path = tiny_fixture("mixtral")
    planner = FixedPlanner()
    engine = Engine(load_model(path, "float32"), load_tokenizer(path),
                    EngineConfig(kv_cache_bytes=32 << 20, max_prefill_tokens=6), planner=planner)
    engine.generate([[1, 2, 3]] * 7, SamplingParams(max_new_tokens=3, ignore_eos=True))
    (job, overrides), = planner.calls
    assert (job.prompt_len, job.gen_len, job.num_sequences) == (3, 3, 7)
    assert overrides["max_prefill_tokens"] == 6 and overrides["block_size"] == 16    # what the config fixes
    used = engine.stats.plan
    assert used.settings == {"max_batch": 5, "attn_micro_batch": 2, "max_prefill_tokens": 6}   # the config wins
    assert used.plan.max_batch == 5 and used.prediction == "its prediction"
    assert max(engine.stats.decode_step_seqs) == 5 and max(engine.stats.prefill_pass_tokens) == 6
    assert engine.runner.attn_micro_batch == 2


def test_engine_falls_back_when_the_planner_fails(tiny_fixture):
    path = tiny_fixture("mixtral")
    engine = Engine(load_model(path, "float32"), load_tokenizer(path), EngineConfig(kv_cache_bytes=32 << 20),
                    planner=FixedPlanner(PlanError("no plan fits")))
    assert engine.settings([12] * 20, 8) == FALLBACK_SETTINGS
    assert engine.stats.plan.plan is None and engine.stats.plan.settings == FALLBACK_SETTINGS

def test_greedy_choice_is_the_first_maximum_in_any_dtype():
    """The sampler picks greedy tokens without widening logits: ties resolve to the first maximum,
    exactly as argmax over float32 does."""
    from moegen.engine.sampler import Sampler
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (64, 1000), generator=g).float()     # many ties per row
    logits[5, 10:20] = 7.0                                             # a tie at the top
    seqs = [type("S", (), {"params": SamplingParams()})() for _ in range(64)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert Sampler().sample(logits.to(dtype), seqs) == logits.argmax(dim=-1).tolist()
    assert Sampler().sample(logits.bfloat16(), seqs)[5] == 10


# ---- generate_iter: completions as they finish ---------------------------------------------------

def test_generate_iter_yields_each_completion_the_moment_it_finishes(tiny_fixture):
    engine = make_engine(tiny_fixture("mixtral"), max_batch=4)
    prompts = [[1, 2, 3], [1, 415, 2936, 9060], [5, 6], [7, 8, 9, 10, 11]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (6, 1, 4, 2)]
    decode_steps_at_yield = {}
    for c in engine.generate_iter(prompts, params):
        decode_steps_at_yield[c.index] = len(engine.stats.decode_step_seqs)   # passes so far
    assert list(decode_steps_at_yield) == [1, 3, 2, 0]                    # finish order
    assert decode_steps_at_yield == {1: 0, 3: 1, 2: 3, 0: 5}              # the step its last token came in
    assert engine.stats.decode_steps == 5


def test_generate_iter_pulls_an_iterable_only_as_far_as_it_needs(tiny_fixture):
    path = tiny_fixture("mixtral")
    prompts = [[1, 415, 2936 + i] + [5] * (i % 3) for i in range(10)]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    pulled = []

    def stream():
        for p in prompts:
            pulled.append(p)
            yield p

    engine = make_engine(path, max_batch=1)
    got, pulled_at_first = {}, None
    for c in engine.generate_iter(stream(), params, indices=iter(range(100, 110)), window=2):
        pulled_at_first = len(pulled) if pulled_at_first is None else pulled_at_first
        got[c.index] = c.token_ids
    assert pulled_at_first <= 2 + 2                                       # the first window and one refill
    reference = make_engine(path).generate(prompts, params)
    assert got == {100 + c.index: c.token_ids for c in reference}         # its own indices, the same tokens
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_closing_generate_iter_early_frees_its_kv_blocks(tiny_fixture):
    engine = make_engine(tiny_fixture("mixtral"), max_batch=2)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    calls = engine.generate_iter([[1, 2, 3]] * 5, params)
    next(calls)
    calls.close()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert len(engine.generate([[1, 2, 3]] * 2, params)) == 2
