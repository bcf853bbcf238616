"""One engine step over the global batch, layer by layer, with module-based batching:
attention (projections over the whole batch, the attention core in micro-batches of sequences
over each one's own KV), then the router over every token of the batch, then each expert that
received tokens once over all of them (weights streamed when on a device)."""
import torch

from moegen.engine.block_manager import BlockManager
from moegen.engine.kv_cache import DecodeContext, PagedKVCache, PrefillContext
from moegen.engine.weight_stream import WeightStreamer


class Runner:
    def __init__(self, model, cache: PagedKVCache, blocks: BlockManager, streamer: WeightStreamer, device,
                 attn_micro_batch: int | None = None, expert_chunk: int = 0, stats=None):
        self.model, self.cache, self.blocks, self.streamer = model, cache, blocks, streamer
        self.device = torch.device(device)
        self.attn_micro_batch = attn_micro_batch
        self.expert_chunk = expert_chunk
        self.stats = stats
        self.top = streamer.weights("model")      # embeddings, final norm, lm_head: always resident

    # --- step inputs: Python lists first, then one tensor per field ----------------------------
    def prefill_context(self, seqs) -> PrefillContext:
        slots = [self.blocks.slot(s.seq_id, p) for s in seqs for p in range(len(s.prompt))]
        return PrefillContext(self.cache, [len(s.prompt) for s in seqs], torch.tensor(slots), self.device)

    def decode_context(self, seqs) -> DecodeContext:
        tables = [self.blocks.tables[s.seq_id] for s in seqs]
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        lens = torch.tensor([s.length for s in seqs], dtype=torch.int32)
        slots = torch.tensor([self.blocks.slot(s.seq_id, s.length - 1) for s in seqs])
        return DecodeContext(self.cache, table, lens, slots, self.device, self.attn_micro_batch)

    # --- the step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs) -> torch.Tensor:
        """Run whole prompts; returns last-token logits [B, V]."""
        tokens = torch.tensor([t for s in seqs for t in s.prompt], device=self.device)
        x = self.forward(tokens, self.prefill_context(seqs))
        last = torch.tensor([len(s.prompt) for s in seqs], device=self.device).cumsum(0) - 1
        return self.model.logits(x[last], self.top)

    @torch.inference_mode()
    def decode(self, seqs) -> torch.Tensor:
        tokens = torch.tensor([s.output[-1] if s.output else s.prompt[-1] for s in seqs], device=self.device)
        return self.model.logits(self.forward(tokens, self.decode_context(seqs)), self.top)

    def forward(self, tokens, ctx) -> torch.Tensor:
        x = self.model.embed(tokens, self.top)
        layers = self.model.layers
        self.streamer.plan([layers[0].prefix])
        for i, layer in enumerate(layers):
            nxt = [layers[i + 1].prefix] if i + 1 < len(layers) else []
            with self.streamer.module(layer.prefix) as w:
                x = layer.forward(w, x, ctx, ffn=lambda w, h: self.feed_forward(layer, w, h, nxt))
        return x

    def feed_forward(self, layer, w, h, next_modules):
        if not layer.is_moe:
            self.streamer.plan(next_modules)
            return layer.ffn.forward(w, h)
        moe = layer.ffn
        dispatch = moe.dispatch(w, h)
        active = dispatch.active_experts()
        if self.stats is not None:
            self.stats.experts_run += len(active)
            self.stats.experts_skipped += moe.n_experts - len(active)
        # only experts that received tokens are announced, hence copied; then the next layer
        self.streamer.plan([moe.expert_key(e) for e in active] + next_modules)
        routed = moe.run_experts(w, h, dispatch, weights_for=self.streamer.module, chunk=self.expert_chunk)
        return moe.combine_shared(w, h, routed)
