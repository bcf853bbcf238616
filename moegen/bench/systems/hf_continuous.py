"""System `hf-continuous`: transformers continuous batching (`model.generate_batch`).

Paged KV cache, requests join and leave the running batch at every step, prefill chunked into
the same steps as decode. Its cache is sized from free memory, which on the CPU means 90% of all
RAM: unless `num_blocks` is given we size it to hold the whole workload at once (CUDA keeps HF's
own sizing). `max_batch_tokens` bounds the tokens of one step (HF's default is 8192; on the CPU we
use 1024, since the attention masks it builds grow with max_batch_tokens x cached tokens).

Prefill and decode run in the same steps, so no single run splits them: prefill time comes from
a separate pass over the same prompts with max_new_tokens=1 (prefill plus one sampled token), and
decode time is the timed run's minus it. Both count only the time requests were being served
(first request scheduled to last one finished, from each GenerationOutput's lifespan), since
generate_batch spends a fixed start-up per call (manager thread, cache allocation: on a GPU 90% of
its free memory) that would otherwise swamp the short prefill-only pass. That start-up is reported
as setup_s, and it is part of wall_s and of e2e tokens/s, which are exact.
"""
from __future__ import annotations

import math
import time

from moegen.errors import InputError
from moegen.engine.stats import RunRecord
from moegen.bench.systems.base import Generation, SystemFailedError, cut_after_eos
from moegen.bench.systems.hf_common import GREEDY, HFHandle, HFSystem, decode_all, synchronize
from moegen.bench.workloads import PromptSet

PAGE_SIZE = 256              # transformers' default page size (tokens per block)
CPU_MAX_BATCH_TOKENS = 1024


class HFContinuousSystem(HFSystem):
    name = "hf-continuous"
    description = "transformers generate_batch(): continuous batching over a paged KV cache"
    options = {"num_blocks": None, "max_batch_tokens": None}

    def cb_config(self, h: HFHandle, wl: PromptSet):
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        cpu = h.device.type == "cpu"
        blocks, batch_tokens = h.options["num_blocks"], h.options["max_batch_tokens"]
        if blocks is None and cpu:
            # every request's prompt + generation, each rounded up to whole pages
            blocks = sum(math.ceil((len(p) + wl.max_new_tokens) / PAGE_SIZE) for p in wl.prompts)
        if batch_tokens is None and cpu:
            batch_tokens = CPU_MAX_BATCH_TOKENS
        for name, value in (("num_blocks", blocks), ("max_batch_tokens", batch_tokens)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"{self.name}: {name} must be an integer >= 1, got {value!r}")
        return ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=batch_tokens), \
            {"num_blocks": blocks, "max_batch_tokens": batch_tokens, "page_size": PAGE_SIZE}

    def _run(self, h: HFHandle, wl: PromptSet, max_new_tokens: int) -> tuple[list, float, float, dict]:
        """(outputs, wall s, serving s, config) of one generate_batch call over the workload."""
        from transformers import GenerationConfig
        cb, info = self.cb_config(h, wl)
        # eos -1 switches EOS off (generate_batch's own convention for "no EOS")
        eos = -1 if wl.ignore_eos else sorted(h.eos)
        gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=h.pad, **GREEDY)
        t0 = time.perf_counter()
        # no inference_mode here: generate_batch works in its own thread, and tensors it made under
        # inference mode on this one cannot be reset there
        results = h.model.generate_batch(inputs=[list(p) for p in wl.prompts], generation_config=gen,
                                         continuous_batching_config=cb, progress_bar=False)
        synchronize(h.device)
        wall = time.perf_counter() - t0
        outs = list(results.values())   # in input order (generate_batch re-orders them so)
        failed = [o.request_id for o in outs if o.error is not None]
        if len(outs) != wl.num_prompts or failed:
            raise SystemFailedError(f"{self.name}: generate_batch returned {len(outs)} of {wl.num_prompts} results"
                                    + (f"; failed: {failed[:5]} ({outs[0].error if outs else ''})" if failed else ""))
        ids = [cut_after_eos(list(o.generated_tokens), h.eos, wl.ignore_eos) for o in outs]
        return ids, wall, serving_s(outs, wall), info

    def generate(self, h: HFHandle, wl: PromptSet) -> Generation:
        _, _, prefill_s, _ = self._run(h, wl, 1)
        outputs, wall, serving, info = self._run(h, wl, wl.max_new_tokens)
        prefill_s = min(prefill_s, serving)
        rec = RunRecord(prompt_lens=[len(p) for p in wl.prompts], gen_lens=[len(o) for o in outputs],
                        prefill_s=prefill_s, decode_s=serving - prefill_s, wall_s=wall)
        config = {**info, "prefill_measured_by": "separate max_new_tokens=1 pass (serving time)"}
        return Generation(outputs, rec, decode_all(h.tokenizer, outputs), {"setup_s": wall - serving}, config)


def serving_s(outputs, wall: float) -> float:
    """From the first request scheduled to the last one finished (perf_counter stamps); the wall
    time when a release of transformers does not stamp lifespans."""
    spans = [getattr(o, "lifespan", None) for o in outputs]
    if not spans or any(s is None or s[0] <= 0 or s[1] <= 0 for s in spans):
        return wall
    return min(max(e for _, e in spans) - min(s for s, _ in spans), wall)
