"""Gated feed-forward (SwiGLU): dense MLP layers, shared experts, and the expert kernel."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def gated_ffn(x, gate_up, down, act=F.silu, out=None):
    """x [T, H] @ gate_up [2I, H] (gate rows first) -> act(gate) * up -> @ down [H, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    h = act(gate).mul_(up)
    return torch.matmul(h, down.t(), out=out)


@dataclass
class DenseMLP:
    """A dense gated MLP stored as gate_proj/up_proj/down_proj (dense layers, shared experts)."""
    prefix: str
    hidden: int
    intermediate: int
    act: str = "silu"

    def weight_shapes(self):
        p, h, i = self.prefix, self.hidden, self.intermediate
        return {f"{p}.gate_proj.weight": (i, h), f"{p}.up_proj.weight": (i, h), f"{p}.down_proj.weight": (h, i)}

    def forward(self, w, x):
        p = self.prefix
        act = ACTIVATIONS[self.act]
        return F.linear(act(F.linear(x, w[f"{p}.gate_proj.weight"])) * F.linear(x, w[f"{p}.up_proj.weight"]),
                        w[f"{p}.down_proj.weight"])
