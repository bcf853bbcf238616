"""What the transformers-based systems share: loading, greedy settings equal to moegen's, pad/EOS
ids, decoding texts with moegen's tokenizer, and a first-logits timer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from moegen.dtypes import parse_dtype
from moegen.engine.stops import eos_ids
from moegen.bench.systems.base import System

# A checkpoint's generation_config.json may ask for sampling or penalties (Qwen sets
# repetition_penalty 1.05, top_k 20...). transformers fills every setting a call leaves unset from
# it, so plain greedy decoding, as moegen does, has to be spelled out.
GREEDY = dict(do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
              min_new_tokens=0, bad_words_ids=None, forced_bos_token_id=None, forced_eos_token_id=None,
              suppress_tokens=None, begin_suppress_tokens=None)


def hf_skip_reason(model_path) -> str | None:
    from moegen.bench.systems.moegen_engine import ConfigModel
    if isinstance(model_path, ConfigModel):
        return "needs a checkpoint with weights (a config name runs with moegen's dummy weights only)"
    return None


def load_hf_model(model_path, dtype: str, **kwargs):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=parse_dtype(dtype), **kwargs).eval()


@dataclass
class HFHandle:
    model: object
    tokenizer: object          # moegen's, so texts decode exactly as moegen's do
    eos: set
    pad: int
    device: torch.device
    options: dict
    info: dict = field(default_factory=dict)    # what loading chose (reported in the run's config)


def make_handle(model, model_path, device, options: dict) -> HFHandle:
    from moegen.errors import TokenizerError
    from moegen.tokenizer import load_tokenizer
    try:
        tokenizer = load_tokenizer(model_path)
    except TokenizerError:          # token-id workloads need none; texts then stay empty
        tokenizer = None
    gen_cfg = model.generation_config
    eos = set(eos_ids(gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else model.config.eos_token_id))
    pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else getattr(model.config, "pad_token_id", None)
    # any id works as padding (the attention mask hides it); EOS is what generate() pads with anyway
    pad = pad if pad is not None else min(eos, default=0)
    return HFHandle(model, tokenizer, eos, int(pad), torch.device(device), options)


def decode_all(tokenizer, token_ids: list) -> list[str]:
    return [tokenizer.decode(ids) if tokenizer else "" for ids in token_ids]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FirstLogitsTimer:
    """A LogitsProcessor that notes when generate() first asks for a token: by then the prefill
    forward pass is done, so (first call - start) is the batch's prefill time (time to first
    token) and (end - first call) its decode time, measured inside the very run being timed."""

    def __init__(self, device: torch.device):
        self.device, self.at = device, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            synchronize(self.device)   # CUDA: wait for the prefill kernels, once per batch
            self.at = time.perf_counter()
        return scores


class HFSystem(System):
    """A transformers-backed system: same skip rule, loading and release for each of them."""

    def skip_reason(self, model_path, device):
        return hf_skip_reason(model_path)

    def load(self, model_path, dtype, device, workload, **options):
        model = load_hf_model(model_path, dtype).to(device)
        return make_handle(model, model_path, device, options)

    def close(self, handle: HFHandle) -> None:
        handle.model = None
