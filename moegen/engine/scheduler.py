"""Admission and the global batch. Plain Python state machine, no torch.

A sequence is admitted when the KV blocks for its whole lifetime (prompt + max_new_tokens) are
free, so a running sequence never waits for memory and nothing is ever preempted. All admitted
sequences form the global batch that each decode step advances; finished sequences free their
blocks, and waiting prompts are admitted in groups large enough to make a prefill step worth it.

Shared work: with prefix caching a sequence's leading prompt blocks already in the cache (or
computed by a sequence admitted before it in the same step) are held, not recomputed, and counted
once in admission; waiting sequences are ordered so that sharers run close together. A request
with SamplingParams(n > 1) is one prompt prefilled once and n samples forked from it (sharing its
full prompt blocks), admitted all together.
"""
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from moegen.engine.block_manager import BlockManager, block_digests
from moegen.engine.params import SamplingParams, SequenceLogprobs
from moegen.errors import CapacityError


@dataclass(eq=False)
class Sequence:
    seq_id: int                       # the request's index in its call
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None           # set when a stop string cut the output
    sample: int = 0                   # which of the request's params.n samples
    leader: "Sequence | None" = field(default=None, repr=False)   # a fork: whose prompt it shares
    forks: list = field(default_factory=list, repr=False)          # a leader's samples 1 .. n-1
    cached_tokens: int = 0            # leading prompt tokens whose K/V was reused, not computed
    digests: list | None = field(default=None, repr=False)   # its full prompt blocks' (prefix caching)
    logprobs: SequenceLogprobs = field(default_factory=SequenceLogprobs, repr=False)   # when params ask

    @property
    def key(self) -> tuple[int, int]:
        """Unique within a call: the KV block table and the sampler's generator are keyed by it."""
        return self.seq_id, self.sample

    @property
    def seed(self) -> int | None:
        """Sample j of request i draws from params.seed + i * n + j: request i alone with n = 1
        draws from seed + i as before, and each sample equals its request run alone (index 0,
        n = 1) with that seed."""
        return None if self.params.seed is None else self.params.seed + self.seq_id * self.params.n + self.sample

    @property
    def group(self) -> list["Sequence"]:
        """The sequences admitted together: this one and its forks."""
        return [self, *self.forks]

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens a prefill pass computes for it (none for a fork)."""
        return len(self.prompt) - self.cached_tokens

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def max_length(self) -> int:
        return len(self.prompt) + self.params.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def with_samples(seq: Sequence) -> Sequence:
    """A request's first sample, its n - 1 others attached as forks (each its own Sequence)."""
    if seq.params.n > 1 and not seq.forks:
        seq.forks = [Sequence(seq.seq_id, seq.prompt, seq.params, sample=j, leader=seq)
                     for j in range(1, seq.params.n)]
    return seq


def with_digests(seq: Sequence, blocks: BlockManager) -> Sequence:
    """The sequence with its full prompt blocks' digests, when the cache shares prefixes."""
    if blocks.caching and seq.digests is None:
        seq.digests = block_digests(seq.prompt, blocks.block_size)
    return seq


def admission_order(seqs, blocks: BlockManager) -> list[Sequence]:
    """Longest first (memory problems surface at once, similar lengths decode together); with
    prefix caching, sharers of a leading block together (see sharing_order)."""
    seqs = list(seqs)
    if not blocks.caching:
        return sorted(seqs, key=lambda s: -s.max_length)
    return sharing_order(seqs, lambda s: s.prompt, lambda s: s.max_length, blocks.block_size)


def sharing_order(items, tokens_of, length_of, block_size: int) -> list:
    """Items grouped by their first block of tokens (groups longest first), and within a group in
    token order, so that any deeper shared prefix is contiguous; items shorter than a block share
    nothing and stand alone. Without sharers this is longest first."""
    groups: dict = {}
    for it in items:
        tokens = tokens_of(it)
        key = tuple(tokens[:block_size]) if len(tokens) >= block_size else id(it)
        groups.setdefault(key, []).append(it)
    ordered = sorted(groups.values(), key=lambda g: -max(map(length_of, g)))
    return [it for g in ordered for it in sorted(g, key=lambda it: (tokens_of(it), -length_of(it)))]


class JobSharing(NamedTuple):
    """What prefix sharing saves a job (its sequences in admission order, nothing evicted)."""
    prompt_lens: list[int]            # every sample's prompt length
    computed_tokens: int              # prompt tokens prefill computes
    blocks: int                       # KV blocks of all lifetimes, shared ones counted once


def job_sharing(seqs: list[Sequence], blocks: BlockManager) -> JobSharing:
    """seqs with their samples and digests, in admission order; blocks: the cache's kind (its
    content plays no part)."""
    empty, claimed = BlockManager(0, blocks.block_size, blocks.caching), set()
    lens, computed, total = [], 0, 0
    for seq in seqs:
        cost, cached = _cost(empty, seq, claimed)
        lens += [len(seq.prompt)] * len(seq.group)
        computed += len(seq.prompt) - cached
        total += cost
    return JobSharing(lens, computed, total)


def _reuse_limit(seq: Sequence) -> int:
    """Prompt tokens that may come from the cache: all but the last, whose logits are needed
    (a prompt that is all cached blocks recomputes its last block instead of writing a shared
    one). A request for prompt log-probabilities computes its whole prompt."""
    return 0 if seq.params.prompt_logprobs is not None else len(seq.prompt) - 1


def _cost(blocks: BlockManager, seq: Sequence, claimed: set) -> tuple[int, int]:
    """(blocks a sequence and its forks take, prompt tokens it reuses) were it allocated now
    after the sequences whose digests are claimed (see BlockManager.admission_cost)."""
    cost, cached = blocks.admission_cost(seq.digests or [], seq.max_length, _reuse_limit(seq), claimed)
    return cost + len(seq.forks) * blocks.fork_cost(seq.max_length, len(seq.prompt)), cached


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, max_prefill_tokens: int):
        self.blocks = blocks
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq = with_digests(with_samples(seq), self.blocks)
        need = self.blocks.blocks_for(seq.max_length) + len(seq.forks) * self.blocks.fork_cost(seq.max_length,
                                                                                                len(seq.prompt))
        if need > self.blocks.num_blocks:
            samples = f" ({len(seq.group)} samples)" if seq.forks else ""
            raise CapacityError(f"sequence {seq.seq_id}{samples} needs {seq.max_length} tokens of KV cache; the cache "
                                f"holds {self.blocks.num_blocks * self.blocks.block_size}: give the KV cache more "
                                "memory (--kv-cache-memory / kv_cache_memory, or --host-memory) or shorten the prompt or max_new_tokens")
        self.waiting.append(seq)

    def add_sorted(self, seqs) -> None:
        """Add in admission order (see admission_order)."""
        for seq in admission_order(seqs, self.blocks):
            self.add(seq)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def _admissible(self) -> tuple[list[Sequence], int]:
        """The leading waiting groups that fit the batch cap, the free blocks and the prefill
        budget (in computed tokens), and those tokens."""
        picked, seqs, tokens, free, claimed = [], 0, 0, self.blocks.num_free, set()
        for seq in self.waiting:
            need, cached = _cost(self.blocks, seq, claimed)
            size = len(seq.group)
            if (((self.running or picked) and len(self.running) + seqs + size > self.max_batch) or need > free
                    or (picked and tokens + len(seq.prompt) - cached > self.max_prefill_tokens)):
                break
            picked.append(seq)
            seqs, tokens, free = seqs + size, tokens + len(seq.prompt) - cached, free - need
        return picked, tokens

    def schedule(self) -> tuple[str, list[Sequence]]:
        """("prefill", newly admitted sequences) or ("decode", the global batch)."""
        picked, tokens = self._admissible()
        # While a batch is decoding, wait until a worthwhile group can join (experts like many tokens).
        min_group = min(len(self.waiting), max(1, self.max_batch // 8))
        if picked and (not self.running or len(picked) >= min_group or tokens * 2 >= self.max_prefill_tokens):
            batch = self._admit(picked)
            if batch:
                self.running.extend(batch)
                return "prefill", batch
        return "decode", list(self.running)

    def _admit(self, picked: list[Sequence]) -> list[Sequence]:
        """Allocate the picked groups in order, as far as the blocks really go (an eviction may
        have taken a block that a later pick counted on), and fork their samples."""
        batch = []
        for seq in picked:
            if _cost(self.blocks, seq, set())[0] > self.blocks.num_free:
                break
            self.waiting.popleft()
            seq.cached_tokens = self.blocks.allocate_prompt(seq.key, seq.max_length, seq.digests or [],
                                                            _reuse_limit(seq))
            for fork in seq.forks:
                self.blocks.fork(seq.key, fork.key, fork.max_length, len(seq.prompt))
                fork.cached_tokens = len(fork.prompt)
            batch += seq.group
        return batch

    def retire_finished(self) -> list[Sequence]:
        """After a step: the blocks it computed hold their K/V now; its finished sequences leave."""
        self.blocks.commit()
        done = [s for s in self.running if s.finished]
        for seq in done:
            self.blocks.release(seq.key)
        self.running = [s for s in self.running if not s.finished]
        return done

    def abandon(self) -> None:
        """Drop every sequence, freeing the blocks of the admitted ones (a call ended early) and
        forgetting the cached blocks a step that never finished was to compute."""
        for seq in self.running:
            self.blocks.release(seq.key)
        self.blocks.rollback()
        self.running, self.waiting = [], deque()
