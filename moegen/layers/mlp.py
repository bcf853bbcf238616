"""Gated feed-forward (SwiGLU): dense MLP layers, shared experts, and the expert kernel."""
from dataclasses import dataclass

import torch.nn.functional as F

from moegen.layers.linear import linear
from moegen.ops.elementwise import fused_ops

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def gated_activation(gate_up, act=F.silu):
    """act(gate) * up for gate_up [T, 2I] (gate columns first); SiLU is one fused pass on the CPU."""
    ops = fused_ops(gate_up) if act is F.silu else None
    if ops is not None:
        return ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate).mul_(up)


def gated_ffn(x, gate_up, down, act=F.silu):
    """x [T, H] @ gate_up [2I, H] (gate rows first) -> act(gate) * up -> @ down [H, I]."""
    return linear(gated_activation(linear(x, gate_up), act), down)


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
