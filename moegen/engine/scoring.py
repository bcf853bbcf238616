"""Log-likelihoods of continuations (lm-eval's loglikelihood requests): batched prefill passes
over context + continuation, no sampling.

Without prefix caching the passes keep no KV. With it, each request's tokens get KV blocks:
requests are ordered so that those sharing a context run together, and a request whose leading
full blocks are cached (its context, computed by the first continuation of that context, in the
same pass or an earlier one) computes only the rest, its queries attending over the cached K/V.
Its blocks are released after its pass and stay cached until evicted.
"""
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from moegen.engine.block_manager import BlockManager, block_digests
from moegen.engine.scheduler import sharing_order
from moegen.errors import InputError
from moegen.layers.attention import RaggedContext


@torch.inference_mode()
def loglikelihood(engine, requests, progress: bool = False) -> list[tuple[float, bool]]:
    """For (context ids, continuation ids) pairs: (sum of log p(continuation | context), whether
    greedy decoding would have produced the continuation), in request order."""
    items = scoring_items(requests, engine.max_model_len)
    results = [None] * len(items)
    bar = tqdm(total=len(items), desc="loglikelihood", disable=not progress, dynamic_ncols=True)
    passes = shared_passes(engine, items) if engine.config.prefix_caching else plain_passes(engine, items)
    for chunk, scores in passes:
        for (i, _, _), res in zip(chunk, scores):
            results[i] = res
        bar.update(len(chunk))
    bar.close()
    return results


def scoring_items(requests, max_model_len: int) -> list[tuple[int, list[int], list[int]]]:
    """(request index, tokens to run = context + continuation but its last token, continuation)."""
    items = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not ctx or not cont:
            raise InputError(f"request {i}: context and continuation must both be non-empty")
        if len(ctx) + len(cont) - 1 > max_model_len:
            raise InputError(f"request {i} has {len(ctx) + len(cont)} tokens; the model's context is {max_model_len}")
        items.append((i, ctx + cont[:-1], cont))
    return items


# --- without prefix caching: whole items, no KV ------------------------------------------------
def plain_passes(engine, items):
    """(chunk, its scores) per prefill pass, items longest first (similar lengths share a pass)."""
    items = sorted(items, key=lambda it: -len(it[1]))
    plan = engine.settings([len(it[1]) for it in items], 1)
    for chunk in chunks(items, plan["max_prefill_tokens"], plan["max_batch"]):
        yield chunk, score_plain(engine, chunk)


def score_plain(engine, chunk) -> list[tuple[float, bool]]:
    t0, experts0 = time.perf_counter(), engine.stats.experts_run
    lens = [len(toks) for _, toks, _ in chunk]
    tokens = torch.tensor([t for _, toks, _ in chunk for t in toks], device=engine.device)
    scores = continuation_scores(engine, engine.runner.forward(tokens, RaggedContext(lens, engine.device)), chunk, lens)
    record_pass(engine, t0, experts0, lens, [0] * len(chunk))
    return scores


def chunks(items, max_tokens: int, max_seqs: int):
    """Consecutive groups of items within the prefill token budget and the batch cap (an item
    longer than the budget goes alone)."""
    chunk, tokens = [], 0
    for it in items:
        if chunk and (tokens + len(it[1]) > max_tokens or len(chunk) >= max_seqs):
            yield chunk
            chunk, tokens = [], 0
        chunk.append(it)
        tokens += len(it[1])
    if chunk:
        yield chunk


# --- with prefix caching: tails over shared KV blocks ------------------------------------------
def reuse_limit(item) -> int:
    """Tokens of an item that may come from the cache: its context but the last token, whose
    logits predict the continuation's first."""
    _, toks, cont = item
    return len(toks) - len(cont)


def shared_passes(engine, items):
    """(chunk, its scores) per prefill pass over the items' uncached tails, sharers together; the
    plan and the KV cache are sized for the tokens really computed (shared blocks once)."""
    bs = engine.config.block_size
    order = sharing_order(items, lambda it: it[1], lambda it: len(it[1]), bs)
    queue = deque((it, block_digests(it[1], bs), reuse_limit(it)) for it in order)
    passes = planned_passes(queue, bs, None, None)
    plan = engine.settings([len(it[1]) for it in order], 1, sum(p.computed for p in passes))
    # enough for two passes' blocks: a pass then finds what the one before it left cached
    passes = planned_passes(queue, bs, plan["max_prefill_tokens"], plan["max_batch"])
    engine.reserve_kv(max(a.blocks_with(b) for a, b in zip(passes, passes[1:] + passes[-1:])))
    while queue:
        admitted = admit(engine.blocks, queue, plan["max_prefill_tokens"], plan["max_batch"])
        if not admitted:          # more blocks than the whole cache holds: this item without KV
            item = queue.popleft()[0]
            yield [item], score_plain(engine, [item])
            continue
        yield [it for it, _, _ in admitted], score_tails(engine, admitted)


@dataclass
class PlannedPass:
    """A pass as admit() would make it were nothing evicted: its computed tokens and the blocks
    its items hold (full blocks by digest, so shared ones count once, and the others)."""
    computed: int = 0
    items: int = 0
    digests: set = field(default_factory=set)
    other_blocks: int = 0

    def blocks_with(self, other: "PlannedPass") -> int:
        return len(self.digests | other.digests) + self.other_blocks + other.other_blocks


def planned_passes(queue, block_size: int, max_tokens: int | None, max_seqs: int | None) -> list[PlannedPass]:
    """The passes over the queued items within the budgets (None: all in one pass)."""
    empty, claimed, passes = BlockManager(0, block_size, True), set(), [PlannedPass()]
    for (_, toks, _), digests, reuse in queue:
        _, cached = empty.admission_cost(digests, len(toks), reuse, claimed)
        tail, last = len(toks) - cached, passes[-1]
        if last.items and ((max_tokens and last.computed + tail > max_tokens) or (max_seqs and last.items >= max_seqs)):
            last = PlannedPass()
            passes.append(last)
        last.computed, last.items = last.computed + tail, last.items + 1
        last.digests.update(digests)
        last.other_blocks += empty.blocks_for(len(toks)) - len(digests)
    return passes


def admit(blocks: BlockManager, queue, max_tokens: int, max_seqs: int) -> list:
    """Allocate leading queue items while they fit the free blocks, the budget of computed tokens
    and the batch cap: (item, block-table key, tokens found cached) each."""
    admitted, tokens = [], 0
    while queue and len(admitted) < max_seqs:
        item, digests, reuse = queue[0]
        cost, cached = blocks.admission_cost(digests, len(item[1]), reuse)
        if cost > blocks.num_free or (admitted and tokens + len(item[1]) - cached > max_tokens):
            break
        queue.popleft()
        key = ("score", item[0])
        admitted.append((item, key, blocks.allocate_prompt(key, len(item[1]), digests, reuse)))
        tokens += len(item[1]) - admitted[-1][2]
    return admitted


def score_tails(engine, admitted) -> list[tuple[float, bool]]:
    """One pass over the admitted items' uncached tails; their blocks are released after it (kept
    cached), and forgotten if the pass fails."""
    t0, experts0, blocks = time.perf_counter(), engine.stats.experts_run, engine.blocks
    parts = [(key, len(item[1]), cached) for item, key, cached in admitted]
    done = False
    try:
        tokens = torch.tensor([t for item, _, cached in admitted for t in item[1][cached:]], device=engine.device)
        x = engine.runner.forward(tokens, engine.runner.tails_context(parts))
        scores = continuation_scores(engine, x, [item for item, _, _ in admitted], [n - c for _, n, c in parts])
        done = True
    finally:
        for key, _, _ in parts:
            blocks.release(key)
        blocks.commit() if done else blocks.rollback()
    record_pass(engine, t0, experts0, [n for _, n, _ in parts], [c for _, _, c in parts])
    return scores


# --- both ---------------------------------------------------------------------------------------
def continuation_scores(engine, x, chunk, lens) -> list[tuple[float, bool]]:
    """Scores from a pass's hidden states x, whose consecutive runs of `lens` rows end with each
    item's continuation positions; logits only there."""
    rows, offset = [], 0
    for (_, _, cont), n in zip(chunk, lens):
        rows.append(torch.arange(offset + n - len(cont), offset + n))
        offset += n
    hidden = x[torch.cat(rows).to(engine.device)]
    logprobs = torch.log_softmax(engine.model.logits(hidden, engine.runner.top).float(), -1)
    out, at = [], 0
    for _, _, cont in chunk:
        lp = logprobs[at:at + len(cont)]
        target = torch.tensor(cont, device=lp.device)
        out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        at += len(cont)
    return out


def record_pass(engine, t0: float, experts0: int, lens: list[int], cached: list[int]) -> None:
    """Stats of one scoring pass: its computed tokens, and its items as sequences that generated
    nothing (lens tokens asked for each, cached of them reused)."""
    engine.stats.add_pass("prefill", sum(lens) - sum(cached), time.perf_counter() - t0,
                          engine.stats.experts_run - experts0)
    engine.stats.add_sequences(lens, [0] * len(lens), cached)
