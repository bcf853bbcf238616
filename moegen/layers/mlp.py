"""Gated feed-forward (SwiGLU): dense MLP layers, shared experts, and the expert kernel."""
from dataclasses import dataclass

import torch.nn.functional as F

from moegen.layers.linear import linear
from moegen.ops.elementwise import fused_ops

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def gated_ffn(x, gate_up, down, act=F.silu):
    """x [T, H] @ gate_up [2I, H] (gate rows first) -> act(gate) * up -> @ down [H, I]."""
    gu = linear(x, gate_up)
    ops = fused_ops(gu) if act is F.silu else None
    if ops is not None:
        h = ops.silu_mul(gu)
    else:
        gate, up = gu.chunk(2, dim=-1)
        h = act(gate).mul_(up)
    return linear(h, down)


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

    def linear_weight_names(self) -> list[str]:
        return list(self.weight_shapes())

    def forward(self, w, x):
        p = self.prefix
        act = ACTIVATIONS[self.act]
        return linear(act(linear(x, w[f"{p}.gate_proj.weight"])) * linear(x, w[f"{p}.up_proj.weight"]),
                      w[f"{p}.down_proj.weight"])
