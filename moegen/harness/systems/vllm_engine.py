"""System `vllm`: vLLM's offline `LLM.generate` (CUDA only; skipped when vLLM is not installed).

Prompts go in as token ids; greedy (temperature 0), `ignore_eos` passed through. Like
hf-continuous, vLLM mixes prefill into decode steps, so prefill time comes from a separate
max_tokens=1 pass and decode time is the wall time minus it. vLLM uses its own kernels, so its
greedy tokens are compared but not required to equal the others' exactly. Options go to
`vllm.LLM(...)` (e.g. gpu_memory_utilization, max_num_seqs, cpu_offload_gb, enforce_eager).
"""
from __future__ import annotations

import importlib.util
import time

from moegen.engine.stats import RunRecord
from moegen.harness.systems.base import Generation, System
from moegen.harness.systems.hf_common import hf_skip_reason
from moegen.harness.workloads import PromptSet


class VLLMSystem(System):
    name = "vllm"
    description = "vLLM offline LLM.generate (continuous batching, PagedAttention)"
    exact = False
    options = {"gpu_memory_utilization": None, "max_num_seqs": None, "max_model_len": None, "cpu_offload_gb": None,
               "enforce_eager": None}

    def skip_reason(self, model_path, device):
        if importlib.util.find_spec("vllm") is None:
            return "vllm is not installed (pip install vllm, on a CUDA machine)"
        if not str(device).startswith("cuda"):
            return f"vllm runs on CUDA here; device is {device}"
        return hf_skip_reason(model_path)

    def load(self, model_path, dtype, device, workload, **options):
        from vllm import LLM
        kwargs = {k: v for k, v in options.items() if v is not None}
        return LLM(model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=0, **kwargs)

    def _run(self, llm, wl: PromptSet, max_tokens: int) -> tuple[list, list, float]:
        from vllm import SamplingParams
        try:
            from vllm import TokensPrompt
        except ImportError:           # older releases keep it in vllm.inputs
            from vllm.inputs import TokensPrompt
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=wl.ignore_eos)
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in wl.prompts]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].text for o in outs], wall

    def generate(self, llm, wl: PromptSet) -> Generation:
        _, _, prefill_s = self._run(llm, wl, 1)
        ids, texts, wall = self._run(llm, wl, wl.max_new_tokens)
        prefill_s = min(prefill_s, wall)
        rec = RunRecord(prompt_lens=[len(p) for p in wl.prompts], gen_lens=[len(o) for o in ids],
                        prefill_s=prefill_s, decode_s=wall - prefill_s, wall_s=wall)
        return Generation(ids, rec, texts, {}, {"prefill_measured_by": "separate max_tokens=1 pass"})
