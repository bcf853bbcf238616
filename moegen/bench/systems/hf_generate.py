"""System `hf-generate`: transformers `generate` over static, left-padded batches.

The baseline most people run. Options: `batch_size` (None = try each of `batch_sizes`, capped at
the number of prompts, and keep the fastest pass, reporting all of them as `sweep`) and
`sort_by_length` (default on: longest prompts first, as lm-eval orders requests, so batches carry
little padding). Greedy; with ignore_eos, EOS is switched off rather than suppressed with
min_new_tokens, which would change the argmax wherever EOS is the top token, whereas moegen (and
vLLM) keep generating and may emit EOS as a token. Prefill and decode time are split at the first
logits call of each batch (FirstLogitsTimer), inside the timed run.
"""
from __future__ import annotations

import time

import torch

from moegen.errors import InputError
from moegen.engine.stats import RunRecord, lockstep_steps
from moegen.bench.metrics import e2e_tokens_per_s
from moegen.bench.systems.base import Generation, cut_after_eos
from moegen.bench.systems.hf_common import GREEDY, FirstLogitsTimer, HFHandle, HFSystem, decode_all, synchronize
from moegen.bench.workloads import PromptSet

BATCH_SIZES = (16, 64, 256)


class HFGenerateSystem(HFSystem):
    name = "hf-generate"
    description = "transformers generate(), static left-padded batches"
    options = {"batch_size": None, "batch_sizes": BATCH_SIZES, "sort_by_length": True}

    def batch_sizes(self, options: dict, n: int) -> list[int]:
        sizes = [options["batch_size"]] if options["batch_size"] is not None else list(options["batch_sizes"])
        if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
            raise InputError(f"{self.name}: batch sizes must be integers >= 1, got {sizes}")
        return sorted({min(b, n) for b in sizes})

    def generate(self, h: HFHandle, workload: PromptSet) -> Generation:
        passes = [self._pass(h, workload, size) for size in self.batch_sizes(h.options, workload.num_prompts)]
        rate = [e2e_tokens_per_s(p.record.generated_tokens, p.record.total_s) for p in passes]
        best = passes[max(range(len(passes)), key=rate.__getitem__)]
        best.extra["sweep"] = [{"batch_size": p.config["batch_size"], "e2e_tokens_per_s": r, "wall_s": p.record.total_s}
                               for p, r in zip(passes, rate)]
        return best

    @torch.inference_mode()
    def _pass(self, h: HFHandle, wl: PromptSet, size: int) -> Generation:
        n = wl.num_prompts
        order = sorted(range(n), key=lambda i: -len(wl.prompts[i])) if h.options["sort_by_length"] else range(n)
        order = list(order)
        batches = [order[i:i + size] for i in range(0, n, size)]
        outputs, prefill_s, decode_s, pass_tokens, step_seqs = [None] * n, 0.0, 0.0, [], []
        eos = None if wl.ignore_eos else sorted(h.eos)
        start = time.perf_counter()
        for batch in batches:
            ids, mask = left_pad([wl.prompts[i] for i in batch], h.pad)
            timer = FirstLogitsTimer(h.device)
            t0 = time.perf_counter()
            out = h.model.generate(ids.to(h.device), attention_mask=mask.to(h.device), max_new_tokens=wl.max_new_tokens,
                                   eos_token_id=eos, pad_token_id=h.pad, logits_processor=[timer], **GREEDY)
            synchronize(h.device)
            t1 = time.perf_counter()
            prefill_s, decode_s = prefill_s + (timer.at - t0), decode_s + (t1 - timer.at)
            new = out[:, ids.shape[1]:].tolist()
            for i, row in zip(batch, new):
                outputs[i] = cut_after_eos(row, h.eos, wl.ignore_eos)
            pass_tokens.append(sum(len(wl.prompts[i]) for i in batch))
            step_seqs += lockstep_steps([len(outputs[i]) for i in batch])
        wall = time.perf_counter() - start
        rec = RunRecord(prompt_lens=[len(p) for p in wl.prompts], gen_lens=[len(o) for o in outputs],
                        prefill_s=prefill_s, decode_s=decode_s, wall_s=wall, prefill_pass_tokens=pass_tokens,
                        decode_step_seqs=step_seqs)
        config = {"batch_size": size, "num_batches": len(batches), "sort_by_length": h.options["sort_by_length"],
                  "padded_prompt_tokens": sum(len(b) * max(len(wl.prompts[i]) for i in b) for b in batches),
                  **h.info}
        return Generation(outputs, rec, decode_all(h.tokenizer, outputs), {"batch_size": size}, config)


def left_pad(prompts: list, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and attention mask, padded on the left so every row's last token lines up."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


