"""Sparse MoE block: route -> dispatch -> experts -> combine (+ shared experts).

Tokens are grouped by expert so each expert with tokens runs one GEMM chain over all of them;
experts that received no token are skipped. Expert weights live under
`{prefix}.experts.{e}.gate_up` [2I, H] and `{prefix}.experts.{e}.down` [H, I] whatever the
on-disk layout (the loader maps per-expert and fused checkpoints onto these names) -- or, once
`pack_fused` has run (bf16 on the CPU), as one tile-packed pair per layer,
`{prefix}.fused_experts.gate_up` / `.down` (and, for quantized experts, their `.scales` and
`.zeros`), which moegen.ops.experts runs in one native call; with experts_kernel=int8 (lossy),
`pack_int8` re-quantizes them to int8 per output column for the int8 kernel instead
(`{prefix}.fused_experts_int8.gate_up` / `.down`, with `.scales` and `.offsets`). With the disk tier, where a layer's
experts stream from disk one by one, each expert's bf16 pair is packed on its own instead
(`tile_expert`; the layer is `tiled`) and the experts run in groups through the same kernel.

Shapes: T tokens, H hidden, I expert intermediate, E experts, k experts per token, R = T*k rows.
"""
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moegen.layers.mlp import ACTIVATIONS, DenseMLP, gated_ffn
from moegen.layers.quantized import dequantize, fits_tiles, is_quantized, tensors_of, tile_codes
from moegen.ops import experts as fused

# a packed weight's tensors under its name: the tiles or codes, then (quantized) scales and zeros
PACKED_PARTS = ("", ".scales", ".zeros")
# an int8-packed one's (experts_kernel=int8): its codes, per-column scales and offsets
INT8_PARTS = ("", ".scales", ".offsets")


@dataclass
class Dispatch:
    """Token slots sorted by expert. Slot s = token * k + j is token's j-th choice; `order` lists
    slots by expert (stable, so each expert's tokens stay in token order)."""
    order: torch.Tensor         # [T*k] slots sorted by expert
    weights: torch.Tensor       # [T*k] router weights in that order
    counts: list[int]           # [E] tokens per expert
    top_k: int

    @classmethod
    def from_routing(cls, top_i, top_w, n_experts: int):
        flat = top_i.flatten()
        order = torch.sort(flat, stable=True)[1]
        counts = torch.bincount(flat, minlength=n_experts).tolist()
        return cls(order, top_w.flatten()[order], counts, top_i.shape[1])

    @property
    def token_idx(self) -> torch.Tensor:
        return self.order // self.top_k

    def active_experts(self):
        return [e for e, c in enumerate(self.counts) if c]

    def combine(self, weighted: torch.Tensor) -> torch.Tensor:
        """Weighted expert outputs (rows in expert order, in the model dtype) summed per token.
        Each token adds its experts in ascending expert id, rounding after each add, which is
        exactly the reference's per-expert index_add_ into a zero tensor, without k*E scatters."""
        position = torch.empty_like(self.order)
        position[self.order] = torch.arange(len(self.order), device=self.order.device)
        # a token's positions in expert order, ascending, are its experts by ascending id
        pos = position.view(-1, self.top_k).sort(dim=1)[0]
        # index_select: the same rows as weighted[idx], ~3x faster on the CPU
        out = weighted.index_select(0, pos[:, 0])
        for j in range(1, self.top_k):
            out += weighted.index_select(0, pos[:, j])
        return out


def _plain_bf16_on_cpu(t) -> bool:
    """A bf16 CPU tensor as loaded (not oneDNN-packed): what the experts kernels pack."""
    return isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and t.device.type == "cpu" and not t.is_mkldnn


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
    tiled: bool = False         # each expert's weights in the kernel's tiles (`tile_expert`)

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

    def expert_weight_names(self) -> list[str]:
        """The routed experts' weights as loaded (before any packing), expert by expert."""
        return [f"{self.expert_key(e)}.{part}" for e in range(self.n_experts) for part in ("gate_up", "down")]

    def linear_weight_names(self) -> list[str]:
        """Names of the GEMM weights as loaded (before any packing)."""
        return self.expert_weight_names() + (self.shared.linear_weight_names() if self.shared is not None else [])

    def dispatch(self, w, x) -> Dispatch:
        return Dispatch.from_routing(*self.router.route(w, x), self.n_experts)

    def fused_names(self) -> tuple[str, str]:
        return f"{self.prefix}.{fused.GATE_UP}", f"{self.prefix}.{fused.DOWN}"

    def int8_names(self) -> tuple[str, str]:
        return f"{self.prefix}.{fused.INT8_GATE_UP}", f"{self.prefix}.{fused.INT8_DOWN}"

    def packed_kind(self, weights: dict) -> str | None:
        """How this layer's experts are packed in `weights`: "fused", "int8" or None (not packed)."""
        return "fused" if self.fused_names()[0] in weights else "int8" if self.int8_names()[0] in weights else None

    def can_fuse(self, weights: dict, dtype: torch.dtype) -> bool:
        """Whether this layer's experts can run in the fused kernel: SiLU experts in a bfloat16
        model whose weights are plain bf16 CPU tensors or quantized ones whose scales fit its tiles."""
        def fits(t) -> bool:
            return fits_tiles(t) if is_quantized(t) else _plain_bf16_on_cpu(t)
        names = self.expert_weight_names()
        # the kernel takes one format per layer: a checkpoint may quantize some projections and not
        # others (e.g. GPTQ groups that do not divide a projection's inputs leave it in bf16)
        formats = {weights[n].format if is_quantized(weights.get(n)) else "bf16" for n in names if n in weights}
        return self.act == "silu" and dtype == torch.bfloat16 and len(formats) == 1 and all(
            fits(weights.get(n)) for n in names)

    def pack_fused(self, weights: dict, release=None) -> None:
        """Replace this layer's per-expert weights in `weights` (in place) by the fused kernel's
        packed pair; `release(tensor)` is called on each plain weight dropped."""
        keys = [self.expert_key(e) for e in range(self.n_experts)]
        as_tiles = lambda t: tile_codes(t) if is_quantized(t) else t
        gate_up, down = fused.pack_layer([as_tiles(weights[f"{k}.gate_up"]) for k in keys],
                                         [as_tiles(weights[f"{k}.down"]) for k in keys], self.intermediate)
        self._replace_experts(weights, self.fused_names(), PACKED_PARTS, (gate_up, down), release)

    def can_pack_int8(self, weights: dict, dtype: torch.dtype) -> bool:
        """Whether this layer's experts can run in the int8 kernel (experts_kernel=int8): SiLU experts
        of a bfloat16 model, each weight a plain bf16 CPU tensor or a quantized one (dequantized to
        bf16 first, whatever its layout)."""
        def fits(t) -> bool:
            return t.device.type == "cpu" if is_quantized(t) else _plain_bf16_on_cpu(t)
        return self.act == "silu" and dtype == torch.bfloat16 and all(
            fits(weights.get(n)) for n in self.expert_weight_names())

    def pack_int8(self, weights: dict, release=None) -> None:
        """Replace this layer's per-expert weights in `weights` (in place) by the int8 kernel's packed
        pair (experts_kernel=int8, lossy): each expert's weights as the exact path sees them (bf16,
        or a quantized checkpoint's dequantized to bf16) re-quantized per output column."""
        keys = [self.expert_key(e) for e in range(self.n_experts)]
        plain = lambda t: dequantize(t, torch.bfloat16) if is_quantized(t) else t
        # one expert's bf16 weights at a time (pack_layer_int8 reads them lazily)
        gate_up, down = fused.pack_layer_int8(lambda e: (plain(weights[f"{keys[e]}.gate_up"]),
                                                         plain(weights[f"{keys[e]}.down"])),
                                              self.n_experts, self.hidden, self.intermediate)
        self._replace_experts(weights, self.int8_names(), INT8_PARTS, (gate_up, down), release)

    def _replace_experts(self, weights: dict, names: tuple[str, str], suffixes: tuple[str, ...], packed: tuple,
                         release) -> None:
        """The packed (gate_up, down) parts stored under `names` (each part under its suffix), the
        per-expert weights dropped, `release(tensor)` called on each."""
        for name, parts in zip(names, packed):
            weights.update((name + suffix, part) for suffix, part in zip(suffixes, parts))
        for name in self.expert_weight_names():
            for t in tensors_of(weights.pop(name)):
                if release is not None:
                    release(t)

    def can_tile(self, weights: dict, dtype: torch.dtype) -> bool:
        """Whether this layer's experts can run in the kernel expert by expert (`tile_expert`):
        SiLU experts whose weights are plain bf16 tensors (or not yet read: meta) in a bf16 model."""
        def plain(t) -> bool:
            return isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and t.device.type in ("cpu", "meta") \
                and not t.is_mkldnn and t.dim() == 2
        return self.act == "silu" and dtype == torch.bfloat16 and all(
            plain(weights.get(n)) for n in self.expert_weight_names())

    def tile_shapes(self) -> dict[str, tuple]:
        """An expert's weights in tiles, by part: gate_up [2, tiles(I, H)] (gate, up), down tiles(H, I)."""
        return {"gate_up": (2, *fused.tiles_shape(self.intermediate, self.hidden)),
                "down": fused.tiles_shape(self.hidden, self.intermediate)}

    def tile_expert(self, part: str, plain: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """One expert's stored weight (`part` gate_up [2I, H] or down [H, I]) packed into its tiles
        (`tile_shapes`; into `out` if given)."""
        out = torch.empty(self.tile_shapes()[part], dtype=torch.bfloat16) if out is None else out
        if part == "down":
            return fused.pack_tiles_into(plain, out)
        fused.pack_tiles_into(plain[:self.intermediate], out[0])
        fused.pack_tiles_into(plain[self.intermediate:], out[1])
        return out

    def packed(self, w, name: str, parts: tuple[str, ...] = PACKED_PARTS) -> list:
        return [w[name + suffix] for suffix in parts if name + suffix in w]

    def run_experts(self, w, x, d: Dispatch, weights_for=None, chunk: int = 0, group: int = 0):
        """Each expert with tokens: one gated FFN over all its tokens (in chunks of `chunk` rows
        if set, to bound memory); results weighted and summed per token. `weights_for(key)` is
        a context manager yielding the expert's weights (the engine streams them); by default
        they come from `w`. Packed layers run every expert in one native call instead; tiled ones
        `group` experts (default all) a call."""
        gate_up_name, down_name = self.fused_names()
        if gate_up_name in w:
            return fused.moe_experts(x, d.token_idx, d.weights, d.counts, self.packed(w, gate_up_name),
                                     self.packed(w, down_name), self.intermediate, d.top_k)
        gate_up_name, down_name = self.int8_names()
        if gate_up_name in w:
            return fused.moe_experts_int8(x, d.token_idx, d.weights, d.counts,
                                          self.packed(w, gate_up_name, INT8_PARTS),
                                          self.packed(w, down_name, INT8_PARTS), self.intermediate, d.top_k)
        if self.tiled:
            return d.combine(self._run_tiled(w, x, d, weights_for, group))
        xs = x.index_select(0, d.token_idx)       # one gather: rows grouped by expert
        # expert output * router weight, computed in their common dtype and rounded to x's once
        # (the reference's `(expert(x) * w).to(dtype)`), written straight into place
        weighted = torch.empty_like(xs)
        act, start = ACTIVATIONS[self.act], 0
        for e, n in enumerate(d.counts):
            if not n:
                continue
            key = self.expert_key(e)
            with (weights_for(key) if weights_for else nullcontext(w)) as we:
                gate_up, down = we[f"{key}.gate_up"], we[f"{key}.down"]
                for lo in range(start, start + n, chunk or n):
                    hi = min(start + n, lo + (chunk or n))
                    torch.mul(gated_ffn(xs[lo:hi], gate_up, down, act), d.weights[lo:hi, None], out=weighted[lo:hi])
            start += n
        return d.combine(weighted)

    def _run_tiled(self, w, x, d: Dispatch, weights_for, group: int) -> torch.Tensor:
        """Every row's weighted expert output ([R, H], as the per-expert path's `weighted`): the
        busy experts in groups of `group`, in expert order, each group's weights held together
        (streamed: the next group's reads go on meanwhile) for one `fused.expert_rows` call."""
        weighted = torch.empty(len(d.token_idx), self.hidden, dtype=x.dtype)
        busy = [e for e, n in enumerate(d.counts) if n]
        starts = [0]
        for n in d.counts:
            starts.append(starts[-1] + n)
        step = group or len(busy) or 1
        for i in range(0, len(busy), step):
            experts = busy[i:i + step]
            first, last = experts[0], experts[-1] + 1
            lo, hi = starts[first], starts[last]
            with ExitStack() as held:
                ws = {e: held.enter_context(weights_for(self.expert_key(e)) if weights_for else nullcontext(w))
                      for e in experts}
                parts = [(ws[e][f"{self.expert_key(e)}.gate_up"], ws[e][f"{self.expert_key(e)}.down"])
                         if e in ws else (None, None) for e in range(first, last)]
                fused.expert_rows(x, d.token_idx[lo:hi], d.weights[lo:hi], d.counts[first:last],
                                  [p[0] for p in parts], [p[1] for p in parts], self.intermediate, weighted[lo:hi])
        return weighted

    def combine_shared(self, w, x, routed):
        if self.shared is None:
            return routed
        shared = self.shared.forward(w, x)
        if self.shared_gate:
            shared = torch.sigmoid(F.linear(x, w[f"{self.prefix}.shared_expert_gate.weight"])) * shared
        return routed + shared

    def forward(self, w, x):
        return self.combine_shared(w, x, self.run_experts(w, x, self.dispatch(w, x)))
