"""Paged KV-cache bookkeeping: which fixed-size blocks each sequence owns. Plain Python, no torch."""
from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free = deque(range(num_blocks))
        self.tables: dict[int, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Reserve blocks for `num_tokens` tokens of a new sequence (its whole lifetime)."""
        n = self.blocks_for(num_tokens)
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        if n > len(self.free):
            raise MemoryError(f"need {n} KV blocks, {len(self.free)} free")
        self.tables[seq_id] = [self.free.popleft() for _ in range(n)]
        return self.tables[seq_id]

    def release(self, seq_id: int) -> None:
        self.free.extend(self.tables.pop(seq_id))

    def slot(self, seq_id: int, position: int) -> int:
        """Flat cache slot (block * block_size + offset) of a sequence's token at `position`."""
        return self.tables[seq_id][position // self.block_size] * self.block_size + position % self.block_size

    @property
    def num_free(self) -> int:
        return len(self.free)
