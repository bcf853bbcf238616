"""Block manager, scheduler and stop checks: plain state machines, tested without a model."""
import pytest

from moegen.engine.block_manager import BlockManager
from moegen.engine.params import SamplingParams
from moegen.engine.scheduler import Scheduler, Sequence
from moegen.engine.stops import finish_reason
from moegen.errors import CapacityError


def seq(i, prompt_len, new=4):
    return Sequence(i, [1] * prompt_len, SamplingParams(max_new_tokens=new))


def test_blocks_allocate_release_and_slots():
    bm = BlockManager(num_blocks=4, block_size=4)
    table = bm.allocate(7, 9)                   # 9 tokens -> 3 blocks
    assert len(table) == 3 and bm.num_free == 1
    assert bm.slot(7, 5) == table[1] * 4 + 1
    with pytest.raises(MemoryError):
        bm.allocate(8, 8)
    bm.release(7)
    assert bm.num_free == 4


def test_admission_respects_kv_budget_and_batch_cap():
    bm = BlockManager(num_blocks=6, block_size=4)
    s = Scheduler(bm, max_batch=2, max_prefill_tokens=1000)
    for i in range(4):
        s.add(seq(i, 4))                         # 4 + 4 tokens -> 2 blocks each
    phase, batch = s.schedule()
    assert phase == "prefill" and [q.seq_id for q in batch] == [0, 1]   # batch cap 2
    assert s.schedule()[0] == "decode"
    batch[0].finish_reason = "stop"
    s.retire_finished()
    phase, batch = s.schedule()
    assert phase == "prefill" and [q.seq_id for q in batch] == [2]


def test_kv_budget_limits_admission():
    bm = BlockManager(num_blocks=3, block_size=4)
    s = Scheduler(bm, max_batch=8, max_prefill_tokens=1000)
    for i in range(3):
        s.add(seq(i, 4))
    phase, batch = s.schedule()
    assert [q.seq_id for q in batch] == [0]      # 2 blocks each, 3 free: one fits


def test_sequence_larger_than_cache_is_refused():
    s = Scheduler(BlockManager(num_blocks=2, block_size=4), max_batch=8, max_prefill_tokens=1000)
    with pytest.raises(CapacityError, match="needs 12 tokens"):
        s.add(seq(0, 8, new=4))


def test_prefill_token_budget_splits_groups():
    s = Scheduler(BlockManager(num_blocks=100, block_size=4), max_batch=8, max_prefill_tokens=10)
    for i in range(3):
        s.add(seq(i, 6))
    assert [q.seq_id for q in s.schedule()[1]] == [0]
    assert s.schedule() == ("prefill", [s.running[1]])


class CharTokenizer:
    """One character per token id."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_a_stop_string_across_tokens_stops_and_cuts_the_text():
    s = Sequence(0, [1], SamplingParams(max_new_tokens=10, stop=["cd"]))
    reasons = []
    for ch in "abcd":
        s.output.append(ord(ch))
        reasons.append(finish_reason(s, ord(ch), (), CharTokenizer()))
    assert reasons == [None, None, None, "stop"] and s.text == "ab"


def test_eos_stops_unless_ignored_and_the_length_limit_ends_the_rest():
    eos = (ord("x"),)
    s = Sequence(0, [1], SamplingParams(max_new_tokens=2))
    s.output.append(ord("x"))
    assert finish_reason(s, ord("x"), eos, None) == "stop"
    s = Sequence(0, [1], SamplingParams(max_new_tokens=2, ignore_eos=True))
    s.output += [ord("x"), ord("x")]
    assert finish_reason(s, ord("x"), eos, None) == "length"


# --- prefix caching and forked samples ------------------------------------------------------------
from moegen.engine.block_manager import block_digests  # noqa: E402
from moegen.engine.scheduler import admission_order  # noqa: E402


def test_digests_name_whole_prefixes():
    first = block_digests([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(first) == 2 and block_digests([1, 2, 3, 4, 5, 6, 7, 8], 4) == first
    other = block_digests([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert other[1] != first[1]             # the same block after another prefix is another prefix


def test_cached_leading_blocks_are_shared_up_to_the_reuse_limit():
    bm = BlockManager(num_blocks=6, block_size=4, prefix_caching=True)
    prompt = list(range(10))                # two full blocks and two tokens
    digests = block_digests(prompt, 4)
    assert bm.allocate_prompt("a", 12, digests, 9) == 0
    assert bm.admission_cost(digests, 12, 9) == (1, 8)       # two blocks shared, one of its own
    assert bm.allocate_prompt("b", 12, digests, 9) == 8
    assert bm.tables["b"][:2] == bm.tables["a"][:2] and bm.num_free == 2
    assert bm.admission_cost(digests, 12, 7) == (2, 4)       # a lower limit shares fewer
    bm.release("a")
    bm.release("b")
    assert bm.num_free == 6 and len(bm.evictable) == 2       # cached and free to take


def test_released_blocks_stay_cached_until_evicted_deepest_first():
    bm = BlockManager(num_blocks=3, block_size=4, prefix_caching=True)
    digests = block_digests(list(range(8)), 4)
    table = bm.allocate("a", 9, digests, 8)
    bm.commit()
    bm.release("a")
    assert bm.cached_prefix(digests, 8) == table[:2]
    bm.allocate("x", 8)                     # the free block, then the cached block released first
    assert bm.evictions == 1 and bm.cached_prefix(digests, 8) == table[:1]
    assert bm.admission_cost(digests, 8, 8) == (2, 4)        # the survivor is taken out of the evictable


def test_a_step_that_never_finished_leaves_no_cached_blocks():
    bm = BlockManager(num_blocks=4, block_size=4, prefix_caching=True)
    digests = block_digests(list(range(8)), 4)
    bm.allocate("a", 8, digests, 7)
    bm.release("a")
    bm.rollback()
    assert bm.cached_prefix(digests, 8) == [] and bm.num_free == 4 and not bm.evictable


def test_forks_share_full_prompt_blocks_and_copy_the_partial_one():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent = bm.allocate("p", 10)           # a 6-token prompt + 4 new tokens
    child = bm.fork("p", "c", 10, prompt_len=6)
    assert child[0] == parent[0] and not set(child[1:]) & set(parent)
    assert bm.take_copies() == [(parent[1], child[1])] and bm.num_free == 10 - 3 - 2
    bm.release("p")
    assert bm.num_free == 10 - 3            # the shared block stays with the child


@pytest.mark.parametrize("caching, cached, free", [(True, [0, 8], 5 - 3 - 1), (False, [0], 5 - 3)])
def test_admission_counts_shared_blocks_once(caching, cached, free):
    bm = BlockManager(num_blocks=5, block_size=4, prefix_caching=caching)
    s = Scheduler(bm, max_batch=8, max_prefill_tokens=1000)
    prompt = list(range(1, 10))             # 9 tokens + 3 new: 3 blocks each, two of them the prompt's
    s.add_sorted([Sequence(i, list(prompt), SamplingParams(max_new_tokens=3)) for i in range(2)])
    phase, batch = s.schedule()
    # sharing, the second holds the first's two blocks (computed in the same pass): both fit in 5
    assert phase == "prefill" and [q.cached_tokens for q in batch] == cached and bm.num_free == free


def test_sharing_order_puts_sharers_together():
    bm = BlockManager(num_blocks=100, block_size=4, prefix_caching=True)
    a, b, c, d = [1, 2, 3, 4] + [9] * 7, [5] * 10, [1, 2, 3, 4, 8], [7] * 8
    seqs = [Sequence(i, p, SamplingParams(max_new_tokens=2)) for i, p in enumerate((a, b, c, d))]
    assert [q.seq_id for q in admission_order(seqs, bm)] == [2, 0, 1, 3]
    assert [q.seq_id for q in admission_order(seqs, BlockManager(100, 4))] == [0, 1, 3, 2]   # longest first


def test_samples_are_admitted_together_over_one_prefill():
    bm = BlockManager(num_blocks=6, block_size=4)
    s = Scheduler(bm, max_batch=8, max_prefill_tokens=1000)
    s.add(Sequence(0, list(range(1, 7)), SamplingParams(max_new_tokens=2, n=3, seed=5)))
    phase, batch = s.schedule()
    assert phase == "prefill" and [q.sample for q in batch] == [0, 1, 2] and batch[2].leader is batch[0]
    assert [q.prefill_tokens for q in batch] == [6, 0, 0] and bm.num_free == 6 - 2 - 1 - 1
    assert len(bm.take_copies()) == 2 and [q.seed for q in batch] == [5, 6, 7]
    with pytest.raises(CapacityError, match=r"\(10 samples\)"):
        s.add(Sequence(1, list(range(1, 7)), SamplingParams(max_new_tokens=2, n=10)))


def test_sample_seeds_follow_seed_plus_index_times_n_plus_sample():
    params = SamplingParams(n=3, seed=100)
    assert Sequence(2, [1], params, sample=1).seed == 100 + 2 * 3 + 1
    assert Sequence(2, [1], SamplingParams(seed=100)).seed == 102      # n = 1: seed + index, as before


# --- scored requests and the step's postprocess ----------------------------------------------------
from moegen.engine.scoring import scoring_sequences  # noqa: E402


def test_scored_requests_are_admitted_shared_and_retired_by_the_one_scheduler():
    bm = BlockManager(num_blocks=8, block_size=4, prefix_caching=True)
    s = Scheduler(bm, max_batch=2, max_prefill_tokens=1000)
    context = list(range(1, 10))            # 9 tokens: two full blocks its continuations may share
    seqs = scoring_sequences([(context, [20]), (context, [21, 22]), (context, [23])], max_model_len=64)
    assert [len(q.prompt) for q in seqs] == [9, 10, 9] and [q.max_length for q in seqs] == [9, 10, 9]
    s.add_sorted(seqs)
    phase, batch = s.schedule()
    assert phase == "prefill" and len(batch) == 2 and [q.cached_tokens for q in batch] == [0, 8]
    done = s.postprocess(batch, [(-1.5, True), (-2.5, False)])
    assert done == batch and [q.score for q in done] == [(-1.5, True), (-2.5, False)] and not s.running
    assert all(q.output == [] for q in done)                # nothing generated
    phase, batch = s.schedule()                             # the next pass finds the context cached
    assert phase == "prefill" and len(batch) == 1 and batch[0].cached_tokens == 8
    s.postprocess(batch, [(-0.5, True)])
    assert s.done and bm.num_free == 8
    prompts, generated, cached = s.served_lens()
    assert sorted(prompts) == [9, 9, 10] and generated == [0, 0, 0] and sorted(cached) == [0, 8, 8]


def test_postprocess_appends_decides_the_finish_and_releases():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = Scheduler(bm, max_batch=4, max_prefill_tokens=1000, eos=(ord("x"),), tokenizer=CharTokenizer())
    s.add_sorted([Sequence(0, [1, 2], SamplingParams(max_new_tokens=3)),
                  Sequence(1, [1, 2], SamplingParams(max_new_tokens=3, stop=["bc"]))])
    _, batch = s.schedule()
    by_id = {q.seq_id: q for q in batch}
    assert s.postprocess(batch, [ord("a"), ord("b")]) == []
    assert s.postprocess(batch, [ord("c")] * 2) == [by_id[1]]      # the stop string "bc" ends sequence 1
    assert by_id[1].finish_reason == "stop" and by_id[1].text == "" and bm.num_free == 2   # cut where it begins
    assert s.postprocess(s.running, [ord("x")]) == [by_id[0]]      # EOS ends sequence 0
    assert by_id[0].output == [ord(c) for c in "acx"] and by_id[0].finish_reason == "stop"
    assert s.done and bm.num_free == 4 and s.served_lens() == ([2, 2], [3, 2], [0, 0])
