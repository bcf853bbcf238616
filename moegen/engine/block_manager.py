"""Paged KV-cache bookkeeping: which fixed-size blocks each sequence holds, and which full prompt
blocks are kept for reuse (prefix caching). Plain Python, no torch.

A full block of prompt tokens is named by a digest of its token ids and of the previous block's
digest, so equal digests mean equal whole prefixes (128-bit BLAKE2b: a collision is as likely as
guessing a random 128-bit key). A sequence whose leading blocks are cached holds them with the
others that do (reference counts) and computes only the rest. A cached block nobody holds stays
cached but evictable: fresh blocks come from the free list first, then from the cached blocks
released longest ago. Blocks are keyed by any hashable sequence key (the engine's (request,
sample)); a sequence's table lists its blocks in token order.
"""
import hashlib
from array import array
from collections import OrderedDict, deque


def block_digests(tokens, block_size: int) -> list[bytes]:
    """The digest of each full block of `tokens`, each chained on the one before."""
    digests, previous = [], b""
    for lo in range(0, len(tokens) - block_size + 1, block_size):
        h = hashlib.blake2b(previous, digest_size=16)
        h.update(array("q", tokens[lo:lo + block_size]).tobytes())
        previous = h.digest()
        digests.append(previous)
    return digests


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.caching = prefix_caching
        self.free = deque(range(num_blocks))        # blocks holding nothing worth keeping
        self.refs = [0] * num_blocks                # sequences holding each block
        self.tables: dict = {}
        self.block_of: dict[bytes, int] = {}        # digest -> the block holding that prefix's K/V
        self.digest_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()   # cached, held by none; oldest first
        self.pending: list[int] = []                # registered this step, K/V not yet computed
        self.copies: list[tuple[int, int]] = []     # (source, destination) blocks forks need copied
        self.evictions = 0                          # cached blocks given up for fresh ones

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: free ones and evictable cached ones."""
        return len(self.free) + len(self.evictable)

    # --- lookups -----------------------------------------------------------------------------
    def cached_prefix(self, digests, reuse_tokens: int) -> list[int]:
        """The cached blocks of the leading digests, at most reuse_tokens tokens' worth."""
        found = []
        for d in digests[:reuse_tokens // self.block_size] if self.caching else ():
            block = self.block_of.get(d)
            if block is None:
                break
            found.append(block)
        return found

    def admission_cost(self, digests, num_tokens: int, reuse_tokens: int, claimed: set | None = None):
        """(blocks taken from num_free, prompt tokens reused) if a sequence of num_tokens were
        allocated now. claimed: digests that sequences picked before it in the same round will
        hold (shared at no cost); this one's are added to it."""
        claimed = set() if claimed is None else claimed
        shared = cost = 0
        for d in digests[:reuse_tokens // self.block_size] if self.caching else ():
            block = self.block_of.get(d)
            if d not in claimed and block is None:
                break
            cost += d not in claimed and self.refs[block] == 0      # taken out of the evictable ones
            shared += 1
        if self.caching:
            claimed.update(digests)
        return cost + self.blocks_for(num_tokens) - shared, shared * self.block_size

    # --- allocation --------------------------------------------------------------------------
    def allocate(self, key, num_tokens: int, digests=(), reuse_tokens: int = 0) -> list[int]:
        """Blocks for `num_tokens` tokens of a new sequence (its whole lifetime): its cached
        leading blocks (up to reuse_tokens tokens), then fresh ones; its full
        prompt blocks (digests) are registered for later sharers."""
        if key in self.tables:
            raise ValueError(f"sequence {key} already holds blocks")
        cost, _ = self.admission_cost(digests, num_tokens, reuse_tokens)
        if cost > self.num_free:
            raise MemoryError(f"need {cost} KV blocks, {self.num_free} free")
        table = [self._hold(b) for b in self.cached_prefix(digests, reuse_tokens)]
        table += [self._fresh() for _ in range(self.blocks_for(num_tokens) - len(table))]
        if self.caching:
            for block, d in zip(table, digests):
                self._register(block, d)
        self.tables[key] = table
        return table

    def allocate_prompt(self, key, num_tokens: int, digests, reuse_tokens: int) -> int:
        """allocate(); returns how many leading prompt tokens were found cached (K/V reused)."""
        shared = len(self.cached_prefix(digests, reuse_tokens))
        self.allocate(key, num_tokens, digests, reuse_tokens)
        return shared * self.block_size

    def fork(self, parent, child, num_tokens: int, prompt_len: int) -> list[int]:
        """A sample forked from `parent` after its prompt: it shares the parent's full prompt
        blocks and gets its own blocks for the rest of num_tokens; the parent's partial last
        prompt block is copied into the child's (copies, done once the prompt is computed)."""
        full = prompt_len // self.block_size
        need = self.blocks_for(num_tokens) - full
        if need > self.num_free:
            raise MemoryError(f"need {need} KV blocks, {self.num_free} free")
        parent_table = self.tables[parent]
        table = [self._hold(b) for b in parent_table[:full]] + [self._fresh() for _ in range(need)]
        if prompt_len % self.block_size:
            self.copies.append((parent_table[full], table[full]))
        self.tables[child] = table
        return table

    def fork_cost(self, num_tokens: int, prompt_len: int) -> int:
        return self.blocks_for(num_tokens) - prompt_len // self.block_size

    def release(self, key) -> None:
        """Drop a sequence's blocks; cached ones nobody holds become evictable, last block first,
        so a prefix's deepest blocks are evicted before the ones others branch from."""
        for block in reversed(self.tables.pop(key)):
            self.refs[block] -= 1
            if self.refs[block]:
                continue
            if block in self.digest_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    # --- step boundaries ---------------------------------------------------------------------
    def commit(self) -> None:
        """The step that computed the pending blocks ran: their K/V is in the cache."""
        self.pending.clear()

    def rollback(self) -> None:
        """A step failed or was abandoned: forget the blocks it was to compute."""
        for block in self.pending:
            self._unregister(block)
            if block in self.evictable:
                del self.evictable[block]
                self.free.append(block)
        self.pending.clear()
        self.copies.clear()

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.copies = self.copies, []
        return copies

    def slot(self, key, position: int) -> int:
        """Flat cache slot (block * block_size + offset) of a sequence's token at `position`."""
        return self.tables[key][position // self.block_size] * self.block_size + position % self.block_size

    # --- internals ---------------------------------------------------------------------------
    def _hold(self, block: int) -> int:
        if self.refs[block] == 0:
            del self.evictable[block]
        self.refs[block] += 1
        return block

    def _fresh(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:           # the cached block released longest ago
            block, _ = self.evictable.popitem(last=False)
            self._unregister(block)
            self.evictions += 1
        self.refs[block] = 1
        return block

    def _register(self, block: int, digest: bytes) -> None:
        if digest in self.block_of or block in self.digest_of:
            return                   # that prefix is cached already (this block recomputes it)
        self.block_of[digest], self.digest_of[block] = block, digest
        self.pending.append(block)

    def _unregister(self, block: int) -> None:
        digest = self.digest_of.pop(block, None)
        if digest is not None and self.block_of.get(digest) == block:
            del self.block_of[digest]
