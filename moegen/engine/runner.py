"""One engine step over the global batch, layer by layer, with module-based batching:
attention (projections over the whole batch, the attention core in micro-batches of sequences
over each one's own KV), then the router over every token of the batch, then each expert that
received tokens once over all of them (weights streamed when on a device)."""
from itertools import accumulate

import torch

from moegen.engine.block_manager import BlockManager
from moegen.engine.kv_cache import DecodeContext, PagedKVCache, PrefillContext
from moegen.engine.transfers import HostStaging
from moegen.engine.weight_stream import WeightStreamer


PREFETCH_ACTIVE = 0.95    # expected share of a layer's experts active above which all are copied before routing


class Runner:
    def __init__(self, model, cache: PagedKVCache, blocks: BlockManager, streamer: WeightStreamer, device,
                 attn_micro_batch: int | None = None, expert_chunk: int = 0, stats=None):
        self.model, self.cache, self.blocks, self.streamer = model, cache, blocks, streamer
        self.device = torch.device(device)
        self.attn_micro_batch = attn_micro_batch
        self.expert_chunk = expert_chunk
        self.stats = stats
        self.top = streamer.weights("model")      # embeddings, final norm, lm_head: always resident
        self.staging = HostStaging(self.device)    # decode's pinned buffers, kept from step to step

    # --- step inputs: Python lists first, then one tensor per field ----------------------------
    def prefill_context(self, seqs) -> PrefillContext:
        """The prompts' tails past their cached tokens (see tails_context)."""
        return self.tails_context([(s.key, len(s.prompt), s.cached_tokens) for s in seqs])

    def tails_context(self, parts) -> PrefillContext:
        """parts: (block-table key, tokens, leading tokens already cached) per sequence; the pass
        computes the rest, whose queries also attend over the cached ones."""
        slots = [self.blocks.slot(key, p) for key, n, cached in parts for p in range(cached, n)]
        pasts = [self.cached_slots(key, cached) if cached else None for key, _, cached in parts]
        return PrefillContext(self.cache, [n - cached for _, n, cached in parts], torch.tensor(slots), self.device,
                              pasts)

    def cached_slots(self, key, cached: int) -> torch.Tensor:
        """Flat cache slots of a sequence's first `cached` tokens (whole blocks)."""
        bs = self.blocks.block_size
        table = torch.tensor(self.blocks.tables[key][:cached // bs], dtype=torch.int64)
        return (table[:, None] * bs + torch.arange(bs)).flatten()

    def decode_context(self, seqs) -> DecodeContext:
        tables = [self.blocks.tables[s.key] for s in seqs]
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        lens = torch.tensor([s.length for s in seqs], dtype=torch.int32)
        slots = torch.tensor([self.blocks.slot(s.key, s.length - 1) for s in seqs])
        return DecodeContext(self.cache, table, lens, slots, self.device, self.attn_micro_batch, self.staging)

    # --- the step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs) -> torch.Tensor:
        """Run the prompts (their uncached tails); returns last-token logits [B, V], one row per
        sequence of seqs (a forked sample gets its leader's row)."""
        return self._prefill(seqs, [False] * len(seqs))[0]

    @torch.inference_mode()
    def prefill_with_prompt_states(self, seqs, wanted: list[bool]):
        """prefill()'s logits, and per sequence of seqs whose flag is set the hidden states of the
        prompt positions it computed but the last ([len(prompt) - 1 - cached, H]; a fork gets its
        leader's), else None. One asking for prompt log-probabilities reuses no cached tokens (the
        scheduler's rule), so all its positions are here; a scored one, all its continuation's."""
        return self._prefill(seqs, wanted)

    def _prefill(self, seqs, wanted: list[bool]):
        x, runs, ends = self._run_prompts(seqs)
        rows = fork_rows(seqs, runs)
        last = torch.tensor([ends[r] - 1 for r in rows], device=self.device)
        states = [x[ends[r] - runs[r].prefill_tokens:ends[r] - 1] if want else None for r, want in zip(rows, wanted)]
        return self.logits(x[last]), states

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden, self.top)

    def _run_prompts(self, seqs):
        """One pass over the prompt tails of seqs' leaders: (hidden states, those leaders, each
        one's end row in the pass)."""
        runs = [s for s in seqs if s.leader is None]
        tokens = torch.tensor([t for s in runs for t in s.prompt[s.cached_tokens:]], device=self.device)
        x = self.forward(tokens, self.prefill_context(runs))
        self.cache.copy_blocks(self.blocks.take_copies())   # forks' own copies of a partial last block
        return x, runs, list(accumulate(s.prefill_tokens for s in runs))

    @torch.inference_mode()
    def decode(self, seqs) -> torch.Tensor:
        tokens = torch.tensor([s.output[-1] if s.output else s.prompt[-1] for s in seqs], device=self.device)
        return self.model.logits(self.forward(tokens, self.decode_context(seqs)), self.top)

    def forward(self, tokens, ctx) -> torch.Tensor:
        x = self.model.embed(tokens, self.top)
        layers = self.model.layers
        prefetched = self.early_experts(layers[0], len(tokens))
        self.streamer.plan([layers[0].prefix] + prefetched)
        for i, layer in enumerate(layers):
            early = prefetched
            prefetched = self.early_experts(layers[i + 1], len(tokens)) if i + 1 < len(layers) else []
            nxt = [layers[i + 1].prefix] + prefetched if i + 1 < len(layers) else []
            with self.streamer.module(layer.prefix) as w:
                x = layer.forward(w, x, ctx, ffn=lambda w, h: self.feed_forward(layer, w, h, nxt, early))
        return x

    def early_experts(self, layer, tokens: int) -> list[str]:
        """A MoE layer's experts announced with its dense weights, before its routing, when `tokens`
        tokens routed at random would leave almost none idle (1 - (1 - k/E)^T >= PREFETCH_ACTIVE):
        their copies then start during its attention. Those that get no token are cancelled. Only
        where weights stream: resident experts need no copy (and the CPU decode loop no extra work)."""
        if not layer.is_moe or not self.streamer.backend.streams:
            return []
        moe = layer.ffn
        idle = (1 - moe.router.top_k / moe.n_experts) ** tokens
        return [moe.expert_key(e) for e in range(moe.n_experts)] if 1 - idle >= PREFETCH_ACTIVE else []

    def feed_forward(self, layer, w, h, next_modules, early=()):
        if not layer.is_moe:
            self.streamer.plan(next_modules)
            return layer.ffn.forward(w, h)
        moe = layer.ffn
        dispatch = moe.dispatch(w, h)
        active = dispatch.active_experts()
        if self.stats is not None:
            self.stats.experts_run += len(active)
            self.stats.experts_skipped += moe.n_experts - len(active)
        # only experts that received tokens are announced (or kept, if announced early), hence
        # copied; then the next layer
        keys = [moe.expert_key(e) for e in active]
        if early:
            early = set(early)
            self.streamer.cancel(sorted(early.difference(keys)))
            keys = [k for k in keys if k not in early]
        self.streamer.plan(keys + next_modules)
        # tiled experts (disk tier) run in groups of half the pool: the next group's reads fill the other half
        group = max(1, self.streamer.num_buffers // 2)
        routed = moe.run_experts(w, h, dispatch, weights_for=self.streamer.module, chunk=self.expert_chunk, group=group)
        return moe.combine_shared(w, h, routed)


def fork_rows(seqs, runs) -> list[int]:
    """For each sequence of seqs, the index of its prompt's run (a fork's leader's) in runs."""
    row = {id(s): i for i, s in enumerate(runs)}
    return [row[id(s.leader or s)] for s in seqs]
