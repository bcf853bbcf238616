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
