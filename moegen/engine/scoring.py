"""Log-likelihoods of continuations (lm-eval's loglikelihood requests): batched prefill passes
over context + continuation, no KV cache, no sampling."""
import time

import torch
from tqdm.auto import tqdm

from moegen.errors import InputError
from moegen.layers.attention import RaggedContext


@torch.inference_mode()
def loglikelihood(engine, requests, progress: bool = False) -> list[tuple[float, bool]]:
    """For (context ids, continuation ids) pairs: (sum of log p(continuation | context), whether
    greedy decoding would have produced the continuation), in request order."""
    items = scoring_items(requests, engine.max_model_len)
    items.sort(key=lambda it: -len(it[1]))      # longest first: similar lengths share a pass
    plan = engine.settings([len(it[1]) for it in items], 1)
    results = [None] * len(items)
    bar = tqdm(total=len(items), desc="loglikelihood", disable=not progress, dynamic_ncols=True)
    for chunk in chunks(items, plan["max_prefill_tokens"], plan["max_batch"]):
        t0, experts0 = time.perf_counter(), engine.stats.experts_run
        for (i, _, _), res in zip(chunk, score_chunk(engine, chunk)):
            results[i] = res
        lens = [len(toks) for _, toks, _ in chunk]
        engine.stats.add_pass("prefill", sum(lens), time.perf_counter() - t0, engine.stats.experts_run - experts0)
        engine.stats.add_sequences(lens, [0] * len(lens))     # scored, nothing generated
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


def score_chunk(engine, chunk) -> list[tuple[float, bool]]:
    """One prefill pass over the chunk's items; logits only at the continuation positions."""
    lens = [len(toks) for _, toks, _ in chunk]
    tokens = torch.tensor([t for _, toks, _ in chunk for t in toks], device=engine.device)
    x = engine.runner.forward(tokens, RaggedContext(lens, engine.device))
    rows, offset = [], 0
    for (_, toks, cont), n in zip(chunk, lens):
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
