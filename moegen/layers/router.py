"""Routers: token -> (top-k expert ids [T, k], weights [T, k]).

Weights keep the dtype the reference keeps (Mixtral and DeepSeek: float32; Qwen/OLMoE: cast back
to the model dtype), since that decides how bfloat16 expert outputs are rounded.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SoftmaxTopKRouter:
    """Softmax over all experts in float32, top-k, optional renormalisation (Mixtral always)."""
    prefix: str          # e.g. "model.layers.0.mlp.gate"
    hidden: int
    n_experts: int
    top_k: int
    renormalize: bool
    weights_in_fp32: bool = False

    def weight_shapes(self):
        return {f"{self.prefix}.weight": (self.n_experts, self.hidden)}

    def route(self, w, x):
        logits = F.linear(x, w[f"{self.prefix}.weight"])
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_i, top_w if self.weights_in_fp32 else top_w.to(logits.dtype)


@dataclass
class GroupedSigmoidRouter:
    """DeepSeek-V3: sigmoid scores; a correction bias used only to *choose*; experts grouped, groups
    ranked by the sum of their two best biased scores, the best `topk_group` groups kept; top-k
    within them; weights are the unbiased scores, optionally renormalised, times a scaling factor."""
    prefix: str
    hidden: int
    n_experts: int
    top_k: int
    n_group: int
    topk_group: int
    renormalize: bool
    scaling: float

    def weight_shapes(self):
        return {f"{self.prefix}.weight": (self.n_experts, self.hidden),
                f"{self.prefix}.e_score_correction_bias": (self.n_experts,)}

    def route(self, w, x):
        logits = F.linear(x.float(), w[f"{self.prefix}.weight"].float())
        scores = logits.sigmoid()
        choice = scores + w[f"{self.prefix}.e_score_correction_bias"].float()
        grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1, sorted=False)[1], 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(self.n_experts // self.n_group, dim=1), float("-inf"))
        top_i = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        top_w = scores.gather(1, top_i)
        if self.renormalize:
            top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
        return top_i, top_w * self.scaling


@dataclass
class GreedySoftmaxRouter:
    """DeepSeek-V2: softmax in float32; top-k over all experts ("greedy") or only within the
    `topk_group` groups holding the best single scores ("group_limited_greedy"); weights times
    a scaling factor, not renormalised."""
    prefix: str
    hidden: int
    n_experts: int
    top_k: int
    scaling: float
    n_group: int = 1
    topk_group: int = 1
    group_limited: bool = False

    def weight_shapes(self):
        return {f"{self.prefix}.weight": (self.n_experts, self.hidden)}

    def route(self, w, x):
        scores = torch.softmax(F.linear(x.float(), w[f"{self.prefix}.weight"].float()), dim=-1)
        if self.group_limited:
            best = scores.view(-1, self.n_group, self.n_experts // self.n_group).max(dim=-1)[0]
            keep = torch.zeros_like(best).scatter_(1, best.topk(self.topk_group, dim=-1, sorted=False)[1], 1.0)
            scores = scores.masked_fill(~keep.bool().repeat_interleave(self.n_experts // self.n_group, dim=1), 0.0)
        top_w, top_i = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        return top_i, top_w * self.scaling
