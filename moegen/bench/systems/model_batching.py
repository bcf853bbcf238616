"""System `moegen-model-batching`: the ablation of module-based batching.

Model-based batching (FlexGen, MoE-Lightning, HF accelerate) picks one batch size for every
module, capped by what attention and its KV cache allow. We emulate it inside our own engine by
setting the global batch G equal to the attention micro-batch A (option `batch_size`, default 32):
each expert then sees only the tokens of one micro-batch per step, instead of those of the whole
global batch. Everything else (kernels, KV layout, streaming) is the same code as `moegen`, so the
difference between the two measures what module-based batching alone buys.
"""
from __future__ import annotations

from moegen.engine.options import engine_option_names
from moegen.errors import InputError
from moegen.bench.systems.moegen_engine import MoegenSystem


class ModelBatchingSystem(MoegenSystem):
    name = "moegen-model-batching"
    description = "moegen engine with one batch size for every module (G = A = batch_size)"
    options = {**dict.fromkeys(o for o in engine_option_names() if o not in ("max_batch", "attn_micro_batch")),
               "batch_size": 32}

    def engine_overrides(self, options: dict) -> dict:
        size = options["batch_size"]
        if not isinstance(size, int) or size < 1:
            raise InputError(f"{self.name}: batch_size must be an integer >= 1, got {size!r}")
        rest = {k: v for k, v in options.items() if k != "batch_size"}
        return {**super().engine_overrides(rest), "max_batch": size, "attn_micro_batch": size}
