"""Rotary position embeddings: default, and any scaled variant (YaRN, ...) through transformers'
rope init functions so the frequencies match the reference exactly."""
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from moegen.errors import ConfigError
from moegen.ops.elementwise import fused_ops


class RotaryEmbedding:
    def __init__(self, config, dim: int, interleaved: bool = False, fp32: bool = False):
        params = getattr(config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.attention_scaling = 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS:
            self.inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        else:
            raise ConfigError(f"config.json rope_parameters.rope_type={rope_type!r} is not supported; "
                              f"supported: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
        self.dim = dim
        self.interleaved = interleaved
        self.fp32 = fp32        # rotate in float32 and round once (DeepSeek-V2's complex-number rope)
        self._last = None       # (positions, dtype, cos, sin): every layer of a step asks for the same

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin [T, dim] for integer positions [T], computed in float32 then cast (as HF does)."""
        dtype = torch.float32 if self.fp32 else dtype
        last = self._last       # one read: another thread may replace it
        if last is not None and last[0] is positions and last[1] == dtype:
            return last[2], last[3]
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)
        self._last = (positions, dtype, cos, sin)
        return cos, sin

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, dim]. Interleaved (DeepSeek) pairs (x0,x1),(x2,x3)... and writes the
        result de-interleaved, as transformers does; q and k get the same layout so scores agree."""
        if self.fp32 and x.dtype != torch.float32:
            return self.apply(x.float(), cos, sin).to(x.dtype)
        ops = None if self.interleaved else fused_ops(x)
        if ops is not None and cos.dtype == x.dtype:
            return ops.rope(x, cos, sin)
        cos, sin = cos[:, None, :], sin[:, None, :]
        if self.interleaved:
            half = cos.shape[-1] // 2
            c, s = cos[..., :half], sin[..., :half]
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
