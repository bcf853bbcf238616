"""Next-token choice: greedy for the whole batch in one argmax; sampling for all sampled rows at
once where the logits are (the device), each row's random draw from its sequence's own
generator, so a seeded request draws the same tokens whatever else is in the batch.
And the log-probabilities a request asks for (SamplingParams.logprobs / prompt_logprobs; their
shape is Completion's docstring): float32 log_softmax of the raw logits, computed only for the
rows of sequences that asked, so a batch where none asks pays nothing."""
import torch

from moegen.engine.params import SamplingParams
from moegen.errors import InputError, NumericsError
from moegen.ops.elementwise import first_max

LOGPROB_ROWS = 256     # rows of [rows, V] float32 log-probabilities made at a time: bounds the memory
                       # of a long prompt's prompt_logprobs or a large batch's logprobs


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of float32 logits."""
    return filter_rows(logits[None], [params])[0]


def filter_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """filter_logits for every row of float32 logits [R, V] at once, row i by params[i], where
    the logits are (on the device: one sort, no copy per row)."""
    def column(values, dtype=logits.dtype):
        return torch.tensor(values, dtype=dtype, device=logits.device)[:, None]
    vocab = logits.shape[-1]
    logits = logits / column([p.temperature for p in params])
    ranked, order = torch.sort(logits, dim=-1, descending=True)
    k = column([min(p.top_k, vocab) if p.top_k else vocab for p in params], torch.int64)
    kept = ranked >= ranked.gather(1, k - 1)          # top-k; ties with the k-th token stay
    probs = torch.softmax(ranked.masked_fill(~kept, float("-inf")), dim=-1)
    # drop tokens once the mass before them already reaches top_p (the first token always stays)
    top_p = column([p.top_p for p in params])
    drop = ~kept | ((probs.cumsum(-1) - probs >= top_p) & (top_p < 1.0))
    return logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


class Sampler:
    def __init__(self):
        self.generators: dict[tuple, torch.Generator] = {}

    def generator(self, seq) -> torch.Generator:
        if seq.key not in self.generators:
            g = torch.Generator()
            # sample j of request i draws from seed + i * n + j (Sequence.seed): reproducible, yet
            # the samples of one prompt and the requests of a call differ
            g.manual_seed(seq.seed if seq.seed is not None else torch.seed())
            self.generators[seq.key] = g
        return self.generators[seq.key]

    def forget(self, seq) -> None:
        self.generators.pop(seq.key, None)

    def sample(self, logits: torch.Tensor, seqs) -> list[int]:
        """logits [B, V] for B sequences -> one token id each (the step's only host sync)."""
        # the first maximum in the model dtype: widening to float32 is exact and order-preserving,
        # so this is argmax of the float32 logits without copying [B, V]; max(dim) rather than
        # argmax because on the CPU its bf16 kernel is ~4x faster (5 vs 20-28 ms at 512 x 32000),
        # and a native kernel for bf16 rows faster still (csrc/elementwise.cpp)
        values, indices = first_max(logits)
        # max propagates NaN, and an Inf logit is its row's max: checking B values checks [B, V]
        if not torch.isfinite(values).all():
            rows = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
            where = ", ".join(f"request {seqs[i].seq_id} at new token {len(seqs[i].output)}" for i in rows[:4])
            raise NumericsError(f"the model's logits are NaN or Inf ({where}); "
                                "try --dtype float32 or check the checkpoint's weights")
        rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        if not rows:
            return indices.tolist()
        tokens = indices.clone()
        tokens[torch.tensor(rows, device=tokens.device)] = self.draw(logits[rows].float(), [seqs[i] for i in rows])
        return tokens.tolist()

    def draw(self, logits: torch.Tensor, seqs) -> torch.Tensor:
        """One token per row of float32 logits [R, V], where they are, by inverse CDF: each row's
        uniform comes from its sequence's own generator, so a seeded draw does not depend on the
        batch. float64 sums: u * total < total, so the token found has a probability > 0."""
        cdf = torch.softmax(filter_rows(logits, [s.params for s in seqs]), dim=-1).double().cumsum(-1)
        u = torch.stack([torch.rand((), dtype=torch.float64, generator=self.generator(s)) for s in seqs])
        return torch.searchsorted(cdf, u.to(cdf.device)[:, None] * cdf[:, -1:], right=True)[:, 0]


# --- log-probabilities ----------------------------------------------------------------------------
def check_logprob_counts(params: SamplingParams, vocab_size: int, where: str) -> None:
    """A request may ask for at most the whole vocabulary's alternatives."""
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and k > vocab_size:
            raise InputError(f"{where}: {name}={k} is more than the model's vocabulary of {vocab_size} tokens")


def token_logprobs(logits: torch.Tensor, chosen: list[int], ks: list[int]) -> list[dict[int, float]]:
    """For each row of logits [N, V]: {token id: log-probability} of chosen[i] first, then the
    ks[i] most likely tokens in descending order (chosen[i] not repeated)."""
    out = []
    for lo in range(0, len(chosen), LOGPROB_ROWS):
        rows = slice(lo, lo + LOGPROB_ROWS)
        lp = torch.log_softmax(logits[rows].float(), dim=-1)
        ids = torch.tensor(chosen[rows], device=lp.device)
        picked = lp.gather(1, ids[:, None])[:, 0].tolist()
        k = max(ks[rows])
        if k:
            top = lp.topk(k, dim=-1)
            top_ids, top_lps = top.indices.tolist(), top.values.tolist()
        else:
            top_ids = top_lps = [[]] * len(picked)
        for token, value, want, alt_ids, alt_lps in zip(chosen[rows], picked, ks[rows], top_ids, top_lps):
            found = {token: value}
            for alt, alt_lp in zip(alt_ids[:want], alt_lps[:want]):
                found.setdefault(alt, alt_lp)
            out.append(found)
    return out


def record_logprobs(logits: torch.Tensor, seqs, tokens: list[int]) -> None:
    """Append, for each sequence that asks, the entry of the token just chosen for it."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    if not rows:
        return
    # the raw logits (before temperature / top-k / top-p), as vLLM reports them by default
    found = token_logprobs(logits[rows] if len(rows) < len(seqs) else logits, [tokens[i] for i in rows],
                           [seqs[i].params.logprobs for i in rows])
    for i, entry in zip(rows, found):
        seqs[i].logprobs.output.append(entry)


@torch.inference_mode()
def record_prompt_logprobs(seqs, hidden: list, logits_of) -> None:
    """Set prompt_logprobs of each sequence that asks, from the hidden states of its prompt
    positions but the last (hidden[i], [len(prompt) - 1, H]; row j predicts prompt token j + 1),
    turned into logits by logits_of LOGPROB_ROWS rows at a time."""
    for seq, states in zip(seqs, hidden):
        k = seq.params.prompt_logprobs
        if k is None:
            continue
        if seq.leader is not None and seq.leader.logprobs.prompt is not None:
            seq.logprobs.prompt = seq.leader.logprobs.prompt      # a forked sample: its prompt's, made once
            continue
        entries = [None]              # the first prompt token has no context to be predicted from
        for lo in range(0, len(states), LOGPROB_ROWS):
            targets = seq.prompt[lo + 1:lo + 1 + LOGPROB_ROWS]
            entries += token_logprobs(logits_of(states[lo:lo + LOGPROB_ROWS]), targets, [k] * len(targets))
        seq.logprobs.prompt = entries
