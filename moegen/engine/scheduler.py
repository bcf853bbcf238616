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

A scored request (Engine.loglikelihood) is a sequence too: its prompt is the context and the
continuation but its last token, it generates nothing, and its prefill's logits over the
continuation give its score. It is admitted, shares prefixes and is counted like any other, and
leaves (its blocks released, kept cached) right after its pass.

After each step, postprocess() is where every output lands: the token appended (or the score
kept), the finish decided (EOS, stop ids and strings, length), the finished released and counted.
"""
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from moegen.engine.block_manager import BlockManager, block_digests
from moegen.engine.params import SamplingParams, SequenceLogprobs
from moegen.engine.stops import finish_reason
from moegen.errors import CapacityError

SCORED = "scored"       # the finish_reason of a scored request once its pass ran


@dataclass(eq=False)
class Sequence:
    seq_id: int                       # the request's index in its call
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" once it ends; SCORED for a scored request
    text: str | None = None           # set when a stop string cut the output
    sample: int = 0                   # which of the request's params.n samples
    leader: "Sequence | None" = field(default=None, repr=False)   # a fork: whose prompt it shares
    forks: list = field(default_factory=list, repr=False)          # a leader's samples 1 .. n-1
    cached_tokens: int = 0            # leading prompt tokens whose K/V was reused, not computed
    digests: list | None = field(default=None, repr=False)   # its full prompt blocks' (prefix caching)
    logprobs: SequenceLogprobs = field(default_factory=SequenceLogprobs, repr=False)   # when params ask
    continuation: list[int] | None = None     # a scored request's: its prompt ends with all but its last token
    score: tuple[float, bool] | None = None   # ... and, once scored, (log-likelihood, greedy)

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
    def max_new_tokens(self) -> int:
        return 0 if self.continuation is not None else self.params.max_new_tokens

    @property
    def max_length(self) -> int:
        return len(self.prompt) + self.max_new_tokens

    @property
    def wants_prompt_states(self) -> bool:
        """Whether its prefill keeps the hidden states of its prompt positions (prompt
        log-probabilities, or a scored continuation's)."""
        return self.params.prompt_logprobs is not None or self.continuation is not None

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
    """Longest first (memory problems surface at once, similar lengths decode together). With
    prefix caching, sharers together: grouped by their first block of tokens (groups longest
    first), and within a group in token order, so that any deeper shared prefix is contiguous;
    prompts shorter than a block share nothing and stand alone."""
    seqs = list(seqs)
    if not blocks.caching:
        return sorted(seqs, key=lambda s: -s.max_length)
    size, groups = blocks.block_size, {}
    for seq in seqs:
        key = tuple(seq.prompt[:size]) if len(seq.prompt) >= size else id(seq)
        groups.setdefault(key, []).append(seq)
    ordered = sorted(groups.values(), key=lambda g: -max(s.max_length for s in g))
    return [seq for g in ordered for seq in sorted(g, key=lambda s: (s.prompt, -s.max_length))]


class JobSharing(NamedTuple):
    """What prefix sharing saves a job (its sequences in admission order, nothing evicted)."""
    prompt_lens: list[int]            # every sample's prompt length
    computed_tokens: int              # prompt tokens prefill computes
    blocks: int                       # KV blocks of all lifetimes, shared ones counted once
    computed: list[int]               # per sequence of the job: the prompt tokens prefill computes for it


def job_sharing(seqs: list[Sequence], blocks: BlockManager) -> JobSharing:
    """seqs with their samples and digests, in admission order; blocks: the cache's kind (its
    content plays no part)."""
    empty, claimed = BlockManager(0, blocks.block_size, blocks.caching), set()
    lens, computed, total = [], [], 0
    for seq in seqs:
        cost, cached = _cost(empty, seq, claimed)
        lens += [len(seq.prompt)] * len(seq.group)
        computed.append(len(seq.prompt) - cached)
        total += cost
    return JobSharing(lens, sum(computed), total, computed)


def scoring_blocks(seqs: list[Sequence], blocks: BlockManager, max_batch: int, max_prefill_tokens: int) -> int:
    """The KV blocks a job of scored requests (seqs, in admission order) wants: the most that two
    consecutive prefill passes within the call's budgets hold, shared blocks once, so a pass finds
    what the one before it left cached. (Its sequences leave after their pass: the job's whole
    lifetime never needs holding at once.)"""
    passes, tokens = [[]], 0
    for seq, computed in zip(seqs, job_sharing(seqs, blocks).computed):
        if passes[-1] and (len(passes[-1]) >= max_batch or tokens + computed > max_prefill_tokens):
            passes.append([])
            tokens = 0
        passes[-1].append(seq)
        tokens += computed
    return max(job_sharing(a + b, blocks).blocks for a, b in zip(passes, passes[1:] + [[]]))


def _reuse_limit(seq: Sequence) -> int:
    """Prompt tokens that may come from the cache: all but those whose logits are needed (the
    last; a scored request's, its context's last and its continuation's), so a prompt that is all
    cached blocks recomputes its last block instead of writing a shared one. A request for prompt
    log-probabilities computes its whole prompt."""
    if seq.params.prompt_logprobs is not None:
        return 0
    return len(seq.prompt) - (len(seq.continuation) if seq.continuation is not None else 1)


def _cost(blocks: BlockManager, seq: Sequence, claimed: set) -> tuple[int, int]:
    """(blocks a sequence and its forks take, prompt tokens it reuses) were it allocated now
    after the sequences whose digests are claimed (see BlockManager.admission_cost)."""
    cost, cached = blocks.admission_cost(seq.digests or [], seq.max_length, _reuse_limit(seq), claimed)
    return cost + len(seq.forks) * blocks.fork_cost(seq.max_length, len(seq.prompt)), cached


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, max_prefill_tokens: int, eos: tuple = (),
                 tokenizer=None):
        """eos: the ids that end generation; tokenizer: decodes outputs for stop strings (None:
        stop strings never match)."""
        self.blocks = blocks
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.eos, self.tokenizer = eos, tokenizer
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.served: list[tuple] = []     # (key, prompt, generated, cached tokens) of each finished sequence

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

    def postprocess(self, batch: list[Sequence], outputs: list) -> list[Sequence]:
        """After a step over batch: each sequence's output (a token id; a scored request's score)
        recorded and its finish decided; then the finished leave (see retire_finished)."""
        for seq, out in zip(batch, outputs):
            if seq.continuation is not None:
                seq.score, seq.finish_reason = out, SCORED
            else:
                seq.output.append(out)
                seq.finish_reason = finish_reason(seq, out, self.eos, self.tokenizer)
        return self.retire_finished()

    def retire_finished(self) -> list[Sequence]:
        """The blocks the step computed hold their K/V now; its finished sequences release theirs
        (full prompt blocks stay cached) and are counted in served."""
        self.blocks.commit()
        done = [s for s in self.running if s.finished]
        for seq in done:
            self.blocks.release(seq.key)
            self.served.append((seq.key, len(seq.prompt), len(seq.output), seq.cached_tokens))
        self.running = [s for s in self.running if not s.finished]
        return done

    def served_lens(self) -> tuple[list[int], list[int], list[int]]:
        """Prompt, generated and cached prompt tokens of each finished sequence, in input order."""
        served = sorted(self.served)
        return [p for _, p, _, _ in served], [g for _, _, g, _ in served], [c for _, _, _, c in served]

    def abandon(self) -> None:
        """Drop every sequence, freeing the blocks of the admitted ones (a call ended early) and
        forgetting the cached blocks a step that never finished was to compute."""
        for seq in self.running:
            self.blocks.release(seq.key)
        self.blocks.rollback()
        self.running, self.waiting = [], deque()
