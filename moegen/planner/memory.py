"""Memory accounting of a moegen run: the engine's weight groups and what stays resident on the
device, the streaming buffers, the working set of a forward pass, and the bytes that cross PCIe
per token when decode attention runs on the CPU. Units: bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from moegen.planner.model_spec import ModelSpec
from moegen.planner.policy import choose_resident

ACTIVATION_SLACK = 1.25        # allocator rounding and transient copies


def format_bytes(n: float) -> str:
    """Binary units, as parse_bytes reads them: 80.0 MiB, 1.50 GiB."""
    n = float(n)
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit in ("GiB", "TiB") else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


# ---- weights: the engine's groups, resident set and buffers -------------------------------------

def model_group_bytes(spec: ModelSpec, dtype_bytes: float) -> int:
    """Embedding, final norm and lm_head: the engine keeps them on the device always."""
    by_module = spec.weight_bytes(dtype_bytes)
    return by_module["embedding"] + by_module["lm_head"] + int(spec.hidden_size * dtype_bytes)


def dense_group_bytes(spec: ModelSpec, layer: int, dtype_bytes: float) -> int:
    """A layer's non-expert weights (attention, norms, router, shared experts or dense MLP)."""
    w = spec.layer_weight_bytes(layer, dtype_bytes)
    return w["total"] - w["routed_experts"]


def buffer_bytes(spec: ModelSpec, dtype_bytes: float) -> int:
    """One streaming buffer: the engine sizes its pool by the largest non-"model" group."""
    dense = max(dense_group_bytes(spec, i, dtype_bytes) for i in range(spec.num_layers))
    return max(dense, spec.expert_bytes(dtype_bytes) if spec.num_moe_layers else 0)


@dataclass(frozen=True)
class ResidentSet:
    dense: tuple[bool, ...]        # per layer: dense group resident
    experts: tuple[int, ...]       # per layer: routed experts resident
    used_bytes: int                # model group included

    def fraction(self, spec: ModelSpec, dtype_bytes: float) -> float:
        return self.used_bytes / spec.weight_bytes(dtype_bytes)["total"]


@lru_cache(maxsize=16)     # the search asks again for every candidate
def _engine_groups(spec: ModelSpec, dtype_bytes: float) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes of each weight group the engine may keep resident besides "model", named and
    ordered as the engine's (moegen.engine.weight_stream.group_weights); the layer of each expert
    group)."""
    sizes, expert_layer = {}, {}
    for i in range(spec.num_layers):
        sizes[f"model.layers.{i}"] = dense_group_bytes(spec, i, dtype_bytes)
    per_expert = spec.expert_bytes(dtype_bytes)
    for i in (i for i, moe in enumerate(spec.moe_layer_mask) if moe):
        for e in range(spec.num_experts):
            key = f"model.layers.{i}.experts.{e}"
            sizes[key], expert_layer[key] = per_expert, i
    return sizes, expert_layer


def resident_set(spec: ModelSpec, budget_bytes: int | None, dtype_bytes: float) -> ResidentSet:
    """What the engine keeps on the device within budget_bytes: the model group (always, counted
    against the budget), then what policy.choose_resident picks. None = everything (CPU, or a
    device that holds the whole model)."""
    n, moe = spec.num_layers, spec.moe_layer_mask
    if budget_bytes is None:
        everything = spec.weight_bytes(dtype_bytes)["total"]
        return ResidentSet((True,) * n, tuple(spec.num_experts if m else 0 for m in moe), everything)
    sizes, expert_layer = _engine_groups(spec, dtype_bytes)
    model = model_group_bytes(spec, dtype_bytes)
    chosen = choose_resident(sizes, sizes, budget_bytes - model)
    experts = [0] * n
    for key in chosen:
        if key in expert_layer:
            experts[expert_layer[key]] += 1
    dense = tuple(f"model.layers.{i}" in chosen for i in range(n))
    return ResidentSet(dense, tuple(experts), model + sum(sizes[k] for k in chosen))


# ---- activations ------------------------------------------------------------------------------

def activation_bytes(spec: ModelSpec, tokens: int, out_rows: int, expert_rows: int, dtype_bytes: float,
                     prefill: bool = False) -> int:
    """Working set of one forward pass over `tokens` tokens: residual stream and attention
    projections, router scores, the widest dense/shared FFN, one expert GEMM chain over
    expert_rows rows, and out_rows rows of fp32 logits for sampling."""
    h, a = spec.hidden_size, spec.attention
    if a.kind == "mla":
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        latent = a.kv_lora_rank + a.qk_rope_head_dim
        # prefill expands per-head q, k, v (+ output); decode's absorbed query and output are latent-wide
        attn = a.n_heads * (2 * qk + 2 * a.v_head_dim) if prefill else a.n_heads * 2 * latent
        attn += a.kv_lora_rank + a.qk_rope_head_dim + a.q_lora_rank
    else:
        attn = 2 * a.n_heads * a.head_dim + 2 * a.n_kv_heads * a.head_dim
    ffn = 3 * max(spec.dense_intermediate, spec.shared_intermediate)
    per_token = (4 * h + attn + ffn) * dtype_bytes + spec.num_experts * 8 + spec.top_k * 24
    expert = expert_rows * (2 * h + 3 * spec.expert_intermediate) * dtype_bytes
    logits = out_rows * spec.vocab_size * (dtype_bytes + 8)
    return int(ACTIVATION_SLACK * (tokens * per_token + expert + logits))



def engine_activation_reserve(spec: ModelSpec, dtype_bytes: float, max_batch: int, max_prefill_tokens: int,
                              expert_chunk: int = 0) -> int:
    """Device memory a streaming engine keeps back for activations: the larger of a prefill pass
    of max_prefill_tokens and a decode step of max_batch rows (logits included)."""
    pre = activation_bytes(spec, max_prefill_tokens, max_batch, min(expert_chunk or max_prefill_tokens,
                                                                     max_prefill_tokens), dtype_bytes, True)
    dec = activation_bytes(spec, max_batch, max_batch, min(expert_chunk or max_batch, max_batch), dtype_bytes)
    return max(pre, dec)


def attention_link_bytes(spec: ModelSpec, dtype_bytes: float) -> tuple[float, float]:
    """Per token per layer with CPU decode attention on a GPU engine: (device->host, host->device)
    bytes: q and the new K/V (or MLA's absorbed query and latent) out, the attention output back."""
    a = spec.attention
    if a.kind == "mla":
        r = a.kv_lora_rank + a.qk_rope_head_dim
        return (a.n_heads * r + r) * dtype_bytes, a.n_heads * a.kv_lora_rank * dtype_bytes
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    return (q + 2 * kv) * dtype_bytes, q * dtype_bytes

