"""Admission and the global batch. Plain Python state machine, no torch.

A sequence is admitted when the KV blocks for its whole lifetime (prompt + max_new_tokens) are
free, so a running sequence never waits for memory and nothing is ever preempted. All admitted
sequences form the global batch that each decode step advances; finished sequences free their
blocks, and waiting prompts are admitted in groups large enough to make a prefill step worth it.
"""
from collections import deque
from dataclasses import dataclass, field

from moegen.engine.block_manager import BlockManager
from moegen.engine.params import SamplingParams
from moegen.errors import CapacityError


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None           # set when a stop string cut the output

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def max_length(self) -> int:
        return len(self.prompt) + self.params.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, max_prefill_tokens: int):
        self.blocks = blocks
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if self.blocks.blocks_for(seq.max_length) > self.blocks.num_blocks:
            raise CapacityError(f"sequence {seq.seq_id} needs {seq.max_length} tokens of KV cache; the cache "
                                f"holds {self.blocks.num_blocks * self.blocks.block_size}: give the KV cache more "
                                "memory (--host-memory / host_memory) or shorten the prompt or max_new_tokens")
        self.waiting.append(seq)

    def add_longest_first(self, seqs) -> None:
        # longest first: memory problems surface at once, and similar lengths decode together
        for seq in sorted(seqs, key=lambda s: -s.max_length):
            self.add(seq)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def _admissible(self) -> list[Sequence]:
        picked, tokens, free = [], 0, self.blocks.num_free
        for seq in self.waiting:
            need = self.blocks.blocks_for(seq.max_length)
            if (len(self.running) + len(picked) >= self.max_batch or need > free
                    or (picked and tokens + len(seq.prompt) > self.max_prefill_tokens)):
                break
            picked.append(seq)
            tokens, free = tokens + len(seq.prompt), free - need
        return picked

    def schedule(self) -> tuple[str, list[Sequence]]:
        """("prefill", newly admitted sequences) or ("decode", the global batch)."""
        picked = self._admissible()
        # While a batch is decoding, wait until a worthwhile group can join (experts like many tokens).
        min_group = min(len(self.waiting), max(1, self.max_batch // 8))
        if picked and (not self.running or len(picked) >= min_group or
                       sum(len(s.prompt) for s in picked) * 2 >= self.max_prefill_tokens):
            for seq in picked:
                self.waiting.popleft()
                self.blocks.allocate(seq.seq_id, seq.max_length)
            self.running.extend(picked)
            return "prefill", picked
        return "decode", list(self.running)

    def retire_finished(self) -> list[Sequence]:
        done = [s for s in self.running if s.finished]
        for seq in done:
            self.blocks.release(seq.seq_id)
        self.running = [s for s in self.running if not s.finished]
        return done

    def abandon(self) -> None:
        """Drop every sequence, freeing the blocks of the admitted ones (a call ended early)."""
        for seq in self.running:
            self.blocks.release(seq.seq_id)
        self.running, self.waiting = [], deque()
