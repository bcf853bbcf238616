"""Log-likelihoods of continuations (lm-eval's loglikelihood requests) as sequences the
scheduler admits like any other (moegen.engine.scheduler): a request's prompt is its context and
its continuation but the last token; it generates nothing, and the logits of its prefill over the
continuation's positions give its score. So a context shared by several continuations is
computed once (prefix caching), and passes are planned, admitted and counted in one place."""
import torch

from moegen.engine.params import SamplingParams
from moegen.engine.sampler import record_logprobs
from moegen.engine.scheduler import Sequence
from moegen.errors import InputError

_PARAMS = SamplingParams(max_new_tokens=1)     # a scored request samples nothing and asks no log-probabilities


def scoring_sequences(requests, max_model_len: int) -> list[Sequence]:
    """One Sequence per (context ids, continuation ids) pair, request i with seq_id i."""
    seqs = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not ctx or not cont:
            raise InputError(f"request {i}: context and continuation must both be non-empty")
        if len(ctx) + len(cont) - 1 > max_model_len:
            raise InputError(f"request {i} has {len(ctx) + len(cont)} tokens; the model's context is {max_model_len}")
        seqs.append(Sequence(i, ctx + cont[:-1], _PARAMS, continuation=cont))
    return seqs


@torch.inference_mode()
def continuation_scores(seqs, last_logits: torch.Tensor, states: list, logits_of) -> list[tuple[float, bool]]:
    """Each scored sequence's (sum of log p(continuation | context), whether greedy decoding
    would have produced the continuation) from its prefill: last_logits[i], its last position's
    logits (they predict the continuation's last token), and states[i], the hidden states of the
    positions it computed before that, whose last len(continuation) - 1 predict the others
    (the scheduler never takes those from the cache). Logits made in one call for all of them."""
    earlier = [st[len(st) - len(seq.continuation) + 1:] for seq, st in zip(seqs, states)]
    rows = sum(len(h) for h in earlier)
    logits = logits_of(torch.cat(earlier)) if rows else None
    out, at = [], 0
    for i, seq in enumerate(seqs):
        k = len(seq.continuation) - 1
        mine = last_logits[i:i + 1] if not k else torch.cat([logits[at:at + k], last_logits[i:i + 1]])
        at += k
        lp = torch.log_softmax(mine.float(), -1)
        target = torch.tensor(seq.continuation, device=lp.device)
        out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


def step_outputs(batch, logits: torch.Tensor, states: list | None, sampler, logits_of) -> list:
    """A step's output per sequence of batch from its logits [B, V] (and the prompt states of a
    prefill that kept them): a token sampled for a generating sequence (with its log-probabilities
    where asked), the score of a scored one."""
    scored, rows = [], []                             # indices of scored and of generating sequences
    for i, s in enumerate(batch):
        (rows if s.continuation is None else scored).append(i)
    if not scored:
        tokens = sampler.sample(logits, batch)
        record_logprobs(logits, batch, tokens)       # only the rows of sequences that ask
        return tokens
    outputs = [None] * len(batch)
    last = logits if len(scored) == len(batch) else logits[scored]     # a loglikelihood call: all scored
    scores = continuation_scores([batch[i] for i in scored], last, [states[i] for i in scored], logits_of)
    for i, score in zip(scored, scores):
        outputs[i] = score
    if rows:
        seqs = [batch[i] for i in rows]
        tokens = sampler.sample(logits[rows], seqs)
        record_logprobs(logits[rows], seqs, tokens)
        for i, token in zip(rows, tokens):
            outputs[i] = token
    return outputs
