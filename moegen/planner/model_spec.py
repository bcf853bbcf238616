"""Shape arithmetic of a MoE model: parameter counts, weight bytes, FLOPs and KV-cache bytes.

A spec is read off the model moegen builds (moegen.models), so the planner plans the very layers
the engine runs: `from_config` takes a transformers config, a config.json dict, a path or the name
of a bundled config, builds the weightless layer objects and reads their shapes (torch is imported
there and only there; the arithmetic below is plain Python). The planner and the metrics read
every size from here, so the counting rules live in one place:

- FLOPs are matmul FLOPs only, 2 per multiply-add; norms, RoPE, softmax, activations and bias adds
  are ignored (they are O(hidden) per token, noise beside the matmuls).
- Attention "core" FLOPs (scores + weighted values) of one query token over `ctx` keys are
  2 * n_heads * min(ctx, window) * (qk_width + v_width) per layer.
- MLA is counted in the form the engine runs (moegen/layers/mla.py): prefill expands the latent
  through kv_b_proj into per-head K/V (qk width nope+rope, v width v_head_dim); decode runs the
  *absorbed* form over the cached latent (qk width kv_lora_rank+rope, v width kv_lora_rank). In
  both forms kv_b_proj's weight is multiplied once per new token (expanding that token's K/V, or
  absorbing its query and un-absorbing its output), so projection FLOPs are 2 * linear weights.
- Prefill computes logits for the last prompt token only (it yields the first new token); each
  further new token costs one decode step, whose token attends over its whole context, itself
  included. So a sequence with prompt P and G new tokens runs G - 1 decode steps at contexts
  P+1 .. P+G-1.

Shape letters: H hidden, V vocab, E routed experts, k top-k, I expert width.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moegen.errors import ConfigError

MODULES = ("embedding", "attention", "norms", "router", "routed_experts", "shared_experts", "dense_mlp", "lm_head")
GATED_MLP_MATRICES = 3   # gate, up, down: every expert and dense MLP of these families is SwiGLU
# Stored bytes per parameter of a quantized GEMM weight, scales included (moegen.layers.quantized):
# FP8 + one float32 scale per 128x128 block; GPTQ codes + per group of 128 a float16 scale and a
# packed zero point (the per-input-feature g_idx, 4 bytes per column of a matrix, is left out).
WEIGHT_FORMAT_BYTES = {"fp8": 1 + 4 / (128 * 128), "int8": 1 + (2 + 1) / 128, "int4": 0.5 + (2 + 0.5) / 128}
# Modules whose GEMM weights a quantized checkpoint stores quantized (embeddings, lm_head, norms
# and routers stay in the model dtype, as DeepSeek-V3's FP8 and the GPTQ releases keep them).
QUANTIZED_MODULES = ("attention", "routed_experts", "shared_experts", "dense_mlp")


def _sum_ctx(first: int, last: int, window: int = 0) -> int:
    """sum_{c=first}^{last} min(c, window) (window 0 = no clipping), in closed form."""
    if last < first:
        return 0

    def tri(a: int, b: int) -> int:   # a + ... + b
        return (a + b) * (b - a + 1) // 2 if b >= a else 0

    if window <= 0 or last <= window:
        return tri(first, last)
    below = tri(first, window) if first <= window else 0
    return below + (last - max(first, window + 1) + 1) * window


@dataclass(frozen=True)
class GQASpec:
    """Grouped-query attention. qk_norm: "none", "head" (Qwen3: [D] per head), "full" (OLMoE)."""
    n_heads: int
    n_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"

    kind = "gqa"

    def linear_params(self, hidden: int) -> int:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return hidden * (q + 2 * kv) + q * hidden

    def quantized_params(self, hidden: int) -> int:
        """Parameters a quantized checkpoint keeps quantized: the projections."""
        return self.linear_params(hidden)

    def params(self, hidden: int) -> int:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        bias = (q + 2 * kv if self.qkv_bias else 0) + (hidden if self.o_bias else 0)
        norm = {"none": 0, "head": 2 * self.head_dim, "full": q + kv}[self.qk_norm]
        return self.linear_params(hidden) + bias + norm

    def core_flops_per_key(self, mla_absorbed: bool = True) -> int:
        return 2 * self.n_heads * 2 * self.head_dim       # q.k and p.v, both head_dim wide

    def kv_elems_per_token(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek multi-head latent attention; q_lora_rank 0 means a full-rank q_proj (V2-Lite)."""
    n_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    bias: bool = False             # attention_bias: q_a_proj, kv_a_proj_with_mqa, o_proj

    kind = "mla"

    def linear_params(self, hidden: int) -> int:
        n, qk = self.n_heads, self.qk_nope_head_dim + self.qk_rope_head_dim
        q = hidden * self.q_lora_rank + self.q_lora_rank * n * qk if self.q_lora_rank else hidden * n * qk
        kv_a = hidden * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_a + kv_b + n * self.v_head_dim * hidden

    def quantized_params(self, hidden: int) -> int:
        """Parameters kept quantized: all projections but kv_b_proj, which the loader dequantizes
        (absorbed decode views it per head)."""
        return self.linear_params(hidden) - self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)

    def params(self, hidden: int) -> int:
        norms = self.kv_lora_rank + self.q_lora_rank     # kv_a_layernorm (+ q_a_layernorm)
        bias = (self.q_lora_rank + self.kv_lora_rank + self.qk_rope_head_dim + hidden) if self.bias else 0
        return self.linear_params(hidden) + norms + bias

    def core_flops_per_key(self, mla_absorbed: bool = True) -> int:
        if mla_absorbed:   # scores over [latent | shared rope key], values are the latent itself
            qk, v = self.kv_lora_rank + self.qk_rope_head_dim, self.kv_lora_rank
        else:              # expanded per-head K/V
            qk, v = self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim
        return 2 * self.n_heads * (qk + v)

    def kv_elems_per_token(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim   # compressed cache: latent + rope key


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    attention: GQASpec | MLASpec
    num_experts: int
    top_k: int
    expert_intermediate: int
    moe_layer_mask: tuple[bool, ...]        # True where the layer's FFN is a routed MoE
    dense_intermediate: int = 0             # FFN width of the non-MoE layers
    shared_intermediate: int = 0            # total width of the shared expert(s), 0 = none
    shared_expert_gate: bool = False        # Qwen2-MoE: sigmoid(Linear(H, 1)) on the shared expert
    router_bias: bool = False               # DeepSeek-V3 e_score_correction_bias [E]
    sliding_windows: tuple[int, ...] = ()   # per layer, 0 = full attention; () = none anywhere
    tie_word_embeddings: bool = False
    weight_format: str = ""                 # GEMM weights quantized: a WEIGHT_FORMAT_BYTES key; "" = model dtype
    name: str = field(default="", compare=False)

    def __post_init__(self):
        where = self.name or "ModelSpec"
        if len(self.moe_layer_mask) != self.num_layers:
            raise ConfigError(f"{where}: moe_layer_mask has {len(self.moe_layer_mask)} entries, "
                              f"num_hidden_layers is {self.num_layers}")
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise ConfigError(f"{where}: {len(self.sliding_windows)} sliding windows for {self.num_layers} layers")
        if any(self.moe_layer_mask) and not 0 < self.top_k <= self.num_experts:
            raise ConfigError(f"{where}: num_experts_per_tok={self.top_k} with {self.num_experts} experts")
        if self.weight_format and self.weight_format not in WEIGHT_FORMAT_BYTES:
            raise ConfigError(f"{where}: weight format {self.weight_format!r}; known: {', '.join(WEIGHT_FORMAT_BYTES)}")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelSpec":
        """cfg: a transformers config, a config.json dict, a path to config.json or a checkpoint
        directory, or the name of a bundled config (see moegen.configs.list_configs()).

        The spec is that of the model moegen builds from cfg: the family builder makes the layer
        objects, which hold shapes and no weights, so nothing model-sized is allocated."""
        from moegen.loader import config_from         # torch and transformers, only when building
        from moegen.models.registry import family
        config = config_from(cfg)
        name = config.name_or_path or (str(cfg) if isinstance(cfg, (str, Path)) else type(config).__name__)
        return cls.from_model(family(config.model_type).build(config), name=name)

    @classmethod
    def from_model(cls, model: Any, name: str = "") -> "ModelSpec":
        """The shapes of a built moegen MoEModel; its weights, if it has any, are not read."""
        name = name or model.config.name_or_path or model.model_type
        return cls(**_spec_fields(model, name), name=name)

    # ---- layers -------------------------------------------------------------------------------

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, moe in enumerate(self.moe_layer_mask) if moe]

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layer_mask)

    def sliding_window(self, layer: int) -> int:
        return self.sliding_windows[layer] if self.sliding_windows else 0

    # ---- parameters (counts) ------------------------------------------------------------------

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """0 when tied: the embedding table is the lm_head (FLOPs and bytes read still count it)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def attention_params(self) -> int:
        """One layer's attention, its q/k (or MLA latent) norms and biases included."""
        return self.attention.params(self.hidden_size)

    def layer_norm_params(self) -> int:
        return 2 * self.hidden_size          # input_layernorm + post_attention_layernorm

    def router_params(self) -> int:
        return self.num_experts * self.hidden_size + (self.num_experts if self.router_bias else 0)

    def expert_params(self) -> int:
        """One routed expert."""
        return GATED_MLP_MATRICES * self.hidden_size * self.expert_intermediate

    def shared_expert_params(self) -> int:
        """All shared experts of one MoE layer, Qwen2's shared-expert gate included."""
        gate = self.hidden_size if self.shared_expert_gate else 0
        return GATED_MLP_MATRICES * self.hidden_size * self.shared_intermediate + gate

    def dense_mlp_params(self) -> int:
        return GATED_MLP_MATRICES * self.hidden_size * self.dense_intermediate

    def layer_params(self, layer: int) -> dict[str, int]:
        """Parameters of one decoder layer by module (all MODULES keys but embedding/lm_head)."""
        moe = self.moe_layer_mask[layer]
        return {"attention": self.attention_params(), "norms": self.layer_norm_params(),
                "router": self.router_params() if moe else 0,
                "routed_experts": self.num_experts * self.expert_params() if moe else 0,
                "shared_experts": self.shared_expert_params() if moe else 0,
                "dense_mlp": 0 if moe else self.dense_mlp_params()}

    def params_by_module(self) -> dict[str, int]:
        """Whole-model parameter counts by module (MODULES), the final norm under "norms"."""
        total = dict.fromkeys(MODULES, 0)
        for layer in range(self.num_layers):
            for module, n in self.layer_params(layer).items():
                total[module] += n
        total["norms"] += self.hidden_size
        total["embedding"], total["lm_head"] = self.embedding_params(), self.lm_head_params()
        return total

    def total_params(self) -> int:
        return sum(self.params_by_module().values())

    def active_params_per_token(self, include_embedding: bool = True) -> int:
        """Parameters one token touches: everything but the routed experts, plus top-k of them.

        include_embedding=False leaves out the input embedding table (a token reads one row of
        it), the convention of DeepSeek's published "activated" counts; Mistral, Qwen and AI2
        count the whole table."""
        by_module = self.params_by_module()
        routed = self.num_moe_layers * self.top_k * self.expert_params()
        active = sum(by_module.values()) - by_module["routed_experts"] + routed
        if include_embedding or self.tie_word_embeddings:   # a tied table is also the lm_head
            return active
        return active - by_module["embedding"]

    # ---- weight bytes -------------------------------------------------------------------------

    def gemm_weight_bytes_per_param(self, dtype_bytes: float = 2) -> float:
        """Stored bytes of one parameter of a GEMM weight: the quantized format's, else dtype_bytes."""
        return WEIGHT_FORMAT_BYTES[self.weight_format] if self.weight_format else dtype_bytes

    def _stored_bytes(self, params: dict[str, int], quantized_attention: int, dtype_bytes: float) -> dict[str, int]:
        """Bytes by module of `params`, the quantized modules at the format's rate (of attention,
        only `quantized_attention` parameters; its norms, biases and MLA's kv_b stay in dtype)."""
        out = {m: int(n * dtype_bytes) for m, n in params.items()}
        if self.weight_format:
            saved = dtype_bytes - self.gemm_weight_bytes_per_param(dtype_bytes)
            for m in QUANTIZED_MODULES:
                quantized = quantized_attention if m == "attention" else params.get(m, 0)
                out[m] = int(params.get(m, 0) * dtype_bytes - quantized * saved)
        out["total"] = sum(out.values())
        return out

    def weight_bytes(self, dtype_bytes: float = 2) -> dict[str, int]:
        """Whole-model weight bytes by module as stored (see weight_format), plus "total"."""
        attention = self.num_layers * self.attention.quantized_params(self.hidden_size)
        return self._stored_bytes(self.params_by_module(), attention, dtype_bytes)

    def layer_weight_bytes(self, layer: int, dtype_bytes: float = 2) -> dict[str, int]:
        return self._stored_bytes(self.layer_params(layer), self.attention.quantized_params(self.hidden_size),
                                  dtype_bytes)

    def expert_bytes(self, dtype_bytes: float = 2) -> int:
        """One routed expert: the unit the engine streams (or skips) per layer."""
        return int(self.expert_params() * self.gemm_weight_bytes_per_param(dtype_bytes))

    def non_expert_bytes(self, dtype_bytes: float = 2) -> int:
        """Weights read once per forward pass whatever the routing: attention, norms, routers,
        shared experts, dense MLP layers, final norm and lm_head (not the embedding table, of
        which a pass reads only its tokens' rows)."""
        by_module = self.weight_bytes(dtype_bytes)
        skip = by_module["routed_experts"] + by_module["embedding"]
        head = int(self.vocab_size * self.hidden_size * dtype_bytes) if self.tie_word_embeddings else 0
        return by_module["total"] - skip + head

    # ---- FLOPs per token ----------------------------------------------------------------------

    def attn_proj_flops(self) -> int:
        """One layer, one token: q/k/v (or MLA q, kv_a, kv_b) and o projections."""
        return 2 * self.attention.linear_params(self.hidden_size)

    def attn_core_flops(self, ctx_len: int, layer: int = 0, mla_absorbed: bool = True) -> int:
        """One layer, one query token attending over ctx_len keys (scores + values)."""
        keys = _sum_ctx(ctx_len, ctx_len, self.sliding_window(layer))
        return self.attention.core_flops_per_key(mla_absorbed) * keys

    def router_flops(self) -> int:
        return 2 * self.hidden_size * self.num_experts

    def expert_flops(self) -> int:
        """One routed expert on one token."""
        return 2 * self.expert_params()

    def routed_expert_flops(self) -> int:
        """The top-k routed experts of one token in one MoE layer."""
        return self.top_k * self.expert_flops()

    def shared_expert_flops(self) -> int:
        return 2 * self.shared_expert_params()

    def dense_mlp_flops(self) -> int:
        return 2 * self.dense_mlp_params()

    def lm_head_flops(self) -> int:
        return 2 * self.vocab_size * self.hidden_size

    def ffn_flops(self, layer: int) -> int:
        """One token through layer's FFN: router + top-k + shared, or the dense MLP."""
        if not self.moe_layer_mask[layer]:
            return self.dense_mlp_flops()
        return self.router_flops() + self.routed_expert_flops() + self.shared_expert_flops()

    def elementwise_elems_per_token(self, layer: int) -> int:
        """Activation elements one token reads plus writes in a layer's non-GEMM passes, as the
        engine runs them (each op a pass over memory): two RMSNorms and two residual adds, RoPE on
        q and k, the K/V cache write; for an MoE layer the gather into expert order, the gated
        activation of each routed row, the router-weighted product and the combine; the gated
        activation of shared experts or a dense MLP."""
        h, a = self.hidden_size, self.attention
        if a.kind == "mla":
            rope = (a.n_heads + 1) * a.qk_rope_head_dim
        else:
            rope = (a.n_heads + a.n_kv_heads) * a.head_dim
        elems = 2 * 2 * h + 2 * 3 * h + 2 * rope + 2 * a.kv_elems_per_token()
        if self.moe_layer_mask[layer]:
            k = self.top_k
            elems += 2 * k * h + 3 * k * self.expert_intermediate + 2 * k * h + (k + 1) * h
            elems += 3 * self.shared_intermediate
        else:
            elems += 3 * self.dense_intermediate
        return elems

    def context_free_flops(self) -> int:
        """One token through every layer, not counting attention over the context nor lm_head."""
        return sum(self.attn_proj_flops() + self.ffn_flops(i) for i in range(self.num_layers))

    def _attn_core_sum(self, first_ctx: int, last_ctx: int, mla_absorbed: bool) -> int:
        """Attention core FLOPs of tokens at contexts first_ctx..last_ctx, all layers."""
        per_key = self.attention.core_flops_per_key(mla_absorbed)
        return per_key * sum(_sum_ctx(first_ctx, last_ctx, self.sliding_window(i)) for i in range(self.num_layers))

    # ---- FLOPs per sequence -------------------------------------------------------------------

    def prefill_flops(self, prompt_len: int, cached: int = 0) -> int:
        """One prompt, causal (token i attends over i+1 keys), logits for the last token only.
        MLA runs expanded K/V in prefill. cached: leading tokens whose K/V was reused (a shared
        prefix): only the others run, each still attending over its whole context; none run for
        a prompt all reused (a forked sample shares its prompt's logits)."""
        if prompt_len - cached <= 0:
            return 0
        core = self._attn_core_sum(cached + 1, prompt_len, mla_absorbed=False)
        return (prompt_len - cached) * self.context_free_flops() + core + self.lm_head_flops()

    def decode_flops(self, context_len: int) -> int:
        """One decode token attending over context_len keys (itself included), with its logits."""
        core = self._attn_core_sum(context_len, context_len, mla_absorbed=True)
        return self.context_free_flops() + core + self.lm_head_flops()

    def decode_steps_flops(self, prompt_len: int, gen_len: int) -> int:
        """The gen_len - 1 decode steps after the prefill, at contexts prompt_len+1 .. prompt_len+gen_len-1."""
        steps = max(gen_len - 1, 0)
        core = self._attn_core_sum(prompt_len + 1, prompt_len + steps, mla_absorbed=True)
        return steps * (self.context_free_flops() + self.lm_head_flops()) + core

    def sequence_flops(self, prompt_len: int, gen_len: int) -> int:
        """Prefill plus every decode step of one sequence generating gen_len new tokens."""
        return self.prefill_flops(prompt_len) + self.decode_steps_flops(prompt_len, gen_len)

    # ---- KV cache -----------------------------------------------------------------------------

    def kv_bytes_per_token(self, dtype_bytes: float = 2) -> int:
        """KV cache one token occupies over all layers (GQA: K and V per kv head; MLA: latent +
        rope key)."""
        return int(self.attention.kv_elems_per_token() * self.num_layers * dtype_bytes)

    def kv_read_bytes(self, context_len: int, dtype_bytes: float = 2) -> int:
        """KV cache bytes one decode token reads, all layers (sliding windows clip the read)."""
        keys = sum(_sum_ctx(context_len, context_len, self.sliding_window(i)) for i in range(self.num_layers))
        return int(keys * self.attention.kv_elems_per_token() * dtype_bytes)

    def decode_kv_read_bytes(self, prompt_len: int, gen_len: int, dtype_bytes: float = 2) -> int:
        """KV cache bytes all gen_len - 1 decode steps of one sequence read."""
        last = prompt_len + max(gen_len - 1, 0)
        keys = sum(_sum_ctx(prompt_len + 1, last, self.sliding_window(i)) for i in range(self.num_layers))
        return int(keys * self.attention.kv_elems_per_token() * dtype_bytes)

    def summary(self, dtype_bytes: float = 2) -> dict[str, Any]:
        """The headline numbers, for printing and JSON."""
        return {"name": self.name, "model_type": self.model_type, "layers": self.num_layers,
                "moe_layers": self.num_moe_layers, "experts": self.num_experts, "top_k": self.top_k,
                "total_params": self.total_params(), "active_params": self.active_params_per_token(),
                "weight_bytes": self.weight_bytes(dtype_bytes)["total"],
                "expert_bytes": self.expert_bytes(dtype_bytes),
                "kv_bytes_per_token": self.kv_bytes_per_token(dtype_bytes)}


# ---- from the built model ---------------------------------------------------------------------
# Layer objects of moegen.layers, read by attribute; torch is already loaded when one exists.

def _attention_spec(attn) -> GQASpec | MLASpec:
    from moegen.layers.mla import MLAAttention
    if isinstance(attn, MLAAttention):
        return MLASpec(n_heads=attn.n_heads, q_lora_rank=attn.q_lora_rank or 0, kv_lora_rank=attn.kv_lora_rank,
                       qk_nope_head_dim=attn.qk_nope_dim, qk_rope_head_dim=attn.qk_rope_dim, v_head_dim=attn.v_dim,
                       bias=attn.bias)
    return GQASpec(n_heads=attn.n_heads, n_kv_heads=attn.n_kv_heads, head_dim=attn.head_dim,
                   qkv_bias=attn.qkv_bias, o_bias=attn.o_bias, qk_norm=attn.qk_norm or "none")


def _moe_fields(moe) -> dict:
    from moegen.layers.router import GroupedSigmoidRouter
    return {"num_experts": moe.n_experts, "top_k": moe.router.top_k, "expert_intermediate": moe.intermediate,
            "shared_intermediate": moe.shared.intermediate if moe.shared is not None else 0,
            "shared_expert_gate": moe.shared_gate,
            # V3's sigmoid router keeps a per-expert correction bias; the softmax routers have none
            "router_bias": isinstance(moe.router, GroupedSigmoidRouter)}


def _alike(values: list, what: str, where: str, none: Any) -> Any:
    """The one value every layer has (`none` when no layer has one): a ModelSpec holds a single
    attention, MoE and dense-MLP shape, so a model whose layers differ cannot be described."""
    if any(v != values[0] for v in values):
        raise ConfigError(f"{where}: layers differ in {what}, which ModelSpec takes to be the same in every layer")
    return values[0] if values else none


def _spec_fields(model, where: str) -> dict:
    layers = model.layers
    windows = tuple(getattr(layer.attn, "sliding_window", 0) for layer in layers)   # MLA has none
    moe = _alike([_moe_fields(layer.ffn) for layer in layers if layer.is_moe], "MoE shape", where,
                 none={"num_experts": 0, "top_k": 0, "expert_intermediate": 0})
    dense = _alike([layer.ffn.intermediate for layer in layers if not layer.is_moe], "dense MLP width", where, none=0)
    return {"model_type": model.model_type, "vocab_size": model.vocab_size, "hidden_size": model.hidden,
            "num_layers": len(layers), "tie_word_embeddings": model.tie_word_embeddings,
            "attention": _alike([_attention_spec(layer.attn) for layer in layers], "attention", where, none=None),
            "moe_layer_mask": tuple(layer.is_moe for layer in layers), "dense_intermediate": dense,
            "sliding_windows": windows if any(windows) else (), "weight_format": _weight_format(model.config), **moe}


def _weight_format(config) -> str:
    """The stored format of the GEMM weights, from the config's quantization_config."""
    from moegen.loader import quant_scheme
    scheme = quant_scheme(config)
    return scheme.weight_format if scheme is not None else ""


def expected_distinct_experts(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected number of experts of one layer that get >= 1 of `tokens` tokens when each token
    picks top_k distinct experts uniformly: an expert is missed by one token with probability
    1 - k/E, by all of them with (1 - k/E)^T."""
    if tokens <= 0 or num_experts <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)

