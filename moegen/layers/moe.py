"""Sparse MoE block: route -> dispatch -> experts -> combine (+ shared experts).

Tokens are grouped by expert so each expert with tokens runs one GEMM chain over all of them;
experts that received no token are skipped. Expert weights live under
`{prefix}.experts.{e}.gate_up` [2I, H] and `{prefix}.experts.{e}.down` [H, I] whatever the
on-disk layout (the loader maps per-expert and fused checkpoints onto these names).
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moegen.layers.mlp import ACTIVATIONS, DenseMLP, gated_ffn


@dataclass
class Dispatch:
    """Tokens sorted by expert: rows of x to gather, their router weights, and per-expert counts."""
    token_idx: torch.Tensor     # [T*k] token row for each (token, slot), sorted by expert
    weights: torch.Tensor       # [T*k] matching router weights
    counts: list[int]           # [E] tokens per expert

    @classmethod
    def from_routing(cls, top_i, top_w, n_experts: int):
        flat = top_i.flatten()
        # stable sort keeps each expert's tokens in ascending token order, as the reference sums them
        order = torch.sort(flat, stable=True)[1]
        counts = torch.bincount(flat, minlength=n_experts).tolist()
        return cls(order // top_i.shape[1], top_w.flatten()[order], counts)

    def active_experts(self):
        return [e for e, c in enumerate(self.counts) if c]


@dataclass
class SparseMoE:
    prefix: str                 # "model.layers.N.mlp" or "...block_sparse_moe"
    hidden: int
    intermediate: int
    n_experts: int
    router: object              # SoftmaxTopKRouter | GroupedSigmoidRouter
    shared: DenseMLP | None = None
    shared_gate: bool = False   # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared_expert(x)
    act: str = "silu"

    def expert_key(self, e: int) -> str:
        return f"{self.prefix}.experts.{e}"

    def weight_shapes(self):
        shapes = dict(self.router.weight_shapes())
        for e in range(self.n_experts):
            shapes[f"{self.expert_key(e)}.gate_up"] = (2 * self.intermediate, self.hidden)
            shapes[f"{self.expert_key(e)}.down"] = (self.hidden, self.intermediate)
        if self.shared is not None:
            shapes.update(self.shared.weight_shapes())
        if self.shared_gate:
            shapes[f"{self.prefix}.shared_expert_gate.weight"] = (1, self.hidden)
        return shapes

    def dispatch(self, w, x) -> Dispatch:
        return Dispatch.from_routing(*self.router.route(w, x), self.n_experts)

    def run_experts(self, w, x, d: Dispatch, weights_for=None, chunk: int = 0):
        """Each expert with tokens: one gated FFN over all its tokens (in chunks of `chunk` rows
        if set, to bound memory), weighted, scattered back. `weights_for(e)` is a context manager
        yielding the expert's weights (the engine streams them); by default they come from `w`."""
        out = torch.zeros_like(x)
        act, start = ACTIVATIONS[self.act], 0
        for e, n in enumerate(d.counts):
            if not n:
                continue
            key = self.expert_key(e)
            with (weights_for(key) if weights_for else nullcontext(w)) as we:
                gate_up, down = we[f"{key}.gate_up"], we[f"{key}.down"]
                for lo in range(start, start + n, chunk or n):
                    hi = min(start + n, lo + (chunk or n))
                    rows = d.token_idx[lo:hi]
                    y = gated_ffn(x[rows], gate_up, down, act)
                    out.index_add_(0, rows, (y * d.weights[lo:hi, None]).to(out.dtype))
            start += n
        return out

    def combine_shared(self, w, x, routed):
        if self.shared is None:
            return routed
        shared = self.shared.forward(w, x)
        if self.shared_gate:
            shared = torch.sigmoid(F.linear(x, w[f"{self.prefix}.shared_expert_gate.weight"])) * shared
        return routed + shared

    def forward(self, w, x):
        return self.combine_shared(w, x, self.run_experts(w, x, self.dispatch(w, x)))
