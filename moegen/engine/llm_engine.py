"""The Engine: admission -> prefill / decode steps over the global batch -> sampling -> stops."""
import logging
import time
from collections.abc import Iterator
from itertools import count, islice, repeat

import torch
from tqdm.auto import tqdm

from moegen.engine.block_manager import BlockManager
from moegen.engine.config import EngineConfig, check_machine, engine_config
from moegen.engine.kv_cache import PagedKVCache, kv_bytes_per_token
from moegen.engine.params import Completion, GenerationDefaults, SamplingParams, encode_prompt
from moegen.engine.runner import Runner
from moegen.engine.sampler import Sampler, check_logprob_counts, record_prompt_logprobs
from moegen.engine.scheduler import (Scheduler, Sequence, admission_order, job_sharing, scoring_blocks, with_digests,
                                     with_samples)
from moegen.engine.scoring import scoring_sequences, step_outputs
from moegen.engine.stats import EngineStats
from moegen.engine.stops import eos_ids
from moegen.engine.weight_setup import WeightSetup
from moegen.engine.weight_stream import SWAPS_PER_PASS
from moegen.dtypes import dtype_name
from moegen.errors import CapacityError, InputError, MoegenError
from moegen.ops.attention import attention_impl
from moegen.planner.cost_model import JobShape
from moegen.planner.measured import MeasuredPlanner
from moegen.planner.policy import FALLBACK_SETTINGS, PLANNED, call_plan


log = logging.getLogger("moegen")
WINDOW = 1024     # prompts generate_iter pulls from an iterable at a time (a few global batches)


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, planner=None,
                 generation_defaults: GenerationDefaults | None = None, **overrides):
        """planner: chooses the settings the config leaves unset, per call (see
        moegen.planner.measured); default: the plan search over this machine's probe.
        generation_defaults: the checkpoint's generation_config.json (EOS ids, sampling defaults)."""
        self.model, self.tokenizer = model, tokenizer
        self.generation_defaults = generation_defaults or GenerationDefaults()
        self.config = cfg = config or EngineConfig(**overrides)
        check_machine(cfg)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and self.device.index is None:    # "cuda" is the current GPU: name it
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_model_len = cfg.max_model_len or getattr(model.config, "max_position_embeddings", 1 << 20)
        block_bytes = kv_bytes_per_token(model, model.dtype) * cfg.block_size
        setup = WeightSetup(model, cfg, self.device)
        self.layout = setup.host_layout(block_bytes)       # None: no host budget, every weight in memory
        disk = self.model.checkpoint.path if self.layout is not None and self.layout.disk else None
        self.planner = planner or MeasuredPlanner(str(self.device), disk)   # probes on first use only
        self.streamer = setup.make_streamer(self.layout)
        self.num_buffers = setup.num_buffers                 # the config's, or what the disk tier chose
        self.device_budget_bytes = setup.device_budget_bytes   # a streaming engine's device budget, else None
        budget = self.layout.kv_bytes if self.layout else setup.kv_budget_bytes(self.streamer)
        # the budget caps the cache; it is allocated (and grown) only as far as calls need it
        if budget < block_bytes:
            raise CapacityError(f"a KV cache of {budget} bytes holds no block ({cfg.block_size} tokens need "
                                f"{block_bytes} bytes for this model): give it more memory (--kv-cache-memory / "
                                "kv_cache_memory)")
        self.max_blocks = budget // block_bytes
        self.blocks = BlockManager(1, cfg.block_size, cfg.prefix_caching)
        self.cache = PagedKVCache(model, 1, cfg.block_size, model.dtype)
        self.stats = EngineStats(attention=attention_impl())
        self.runner = Runner(model, self.cache, self.blocks, self.streamer, self.device,
                             cfg.attn_micro_batch, cfg.expert_chunk, self.stats)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype="bfloat16", host_memory=None, device_memory=None, **kw):
        """Load a HF checkpoint directory. host_memory: bytes (or "8GB") of host memory the engine
        may use in all (weights, streaming buffers, KV cache, activations; the weights that do not
        fit stream from the checkpoint's files); device_memory: device budget for resident weights
        and streaming buffers."""
        from moegen.loader import Checkpoint
        from moegen.tokenizer import optional_tokenizer
        cfg = engine_config(device, host_memory, device_memory, kw)   # bad settings fail before a long load
        defaults = GenerationDefaults.read(path)
        model = Checkpoint(path, dtype).model     # weights read by the engine: all, or what host_memory holds
        return cls(model, optional_tokenizer(path), cfg, generation_defaults=defaults)

    @classmethod
    def from_config(cls, config, dummy_weights=True, device="cpu", dtype="bfloat16", host_memory=None,
                    device_memory=None, seed: int = 0, **kw):
        """An engine over random weights of a config's shapes (config object, dict, config.json,
        or a bundled name such as "deepseek-v2-lite"); no tokenizer, so prompts are token ids."""
        from moegen.errors import ConfigError
        from moegen.loader import dummy_model
        if not dummy_weights:
            raise ConfigError("Engine.from_config needs dummy_weights=True; use from_pretrained for real weights")
        cfg = engine_config(device, host_memory, device_memory, kw)
        return cls(dummy_model(config, dtype, seed), None, cfg)

    # --- inputs --------------------------------------------------------------------------------
    def encode(self, prompt, index: int, max_new_tokens: int, truncate: str | None) -> list[int]:
        return encode_prompt(prompt, index, max_new_tokens, truncate, self.tokenizer, self.model.vocab_size,
                             self.max_model_len)

    # --- generation ----------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False, truncate: str | None = None) -> list[Completion]:
        """Completions for prompts (strings or token-id lists), in input order."""
        prompts = list(prompts)
        outs = [None] * len(prompts)
        for completion in self.generate_iter(prompts, params, truncate=truncate, progress=progress):
            outs[completion.index] = completion
        return outs

    def generate_iter(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                      truncate: str | None = None, indices=None, window: int | None = None,
                      progress: bool = False):
        """Each Completion the moment its sequence finishes (finish order), with its input `index`
        (SamplingParams(n > 1): the moment its last sample finishes, all n in `samples`).

        prompts: a list, admitted as a whole (longest first, KV reserved for all of it, planned on
        all of it), or any other iterable, pulled in windows and never read further ahead: the
        first `window` prompts (default WINDOW) give the plan (their mean length, their count),
        each window is sorted longest first, the next is pulled when fewer than a global batch
        wait, and the KV cache is the whole budget (a stream's length is unknown). params: one
        SamplingParams, or a list with one per prompt of a list (an iterator of them beside any
        other iterable of prompts, pulled in step with it). indices: each prompt's index
        (default 0, 1, ...); a resumed job passes its rows' own, so seeded sampling matches an
        uninterrupted run. One call at a time per engine; closing the iterator early frees its KV."""
        seqs = self._sequences(prompts, params or SamplingParams(), truncate, indices)
        whole = isinstance(prompts, (list, tuple))
        first = list(islice(seqs, None if whole else window or WINDOW))
        if not first:
            return
        scheduler = self._scheduler_for(first, whole)
        refill = max(window or WINDOW, 2 * scheduler.max_batch)
        bar = tqdm(total=len(first) if whole else None, desc="generate", unit="seq", disable=not progress,
                   dynamic_ncols=True)
        unfinished = {}
        for seq in self._serve(scheduler, seqs, refill, bar):
            done = self._request_done(seq, unfinished)
            if done is not None:
                bar.update(1)
                yield done

    def _scheduler_for(self, first: list[Sequence], whole: bool) -> Scheduler:
        """Plan the call on its first sequences (every sample, the prompt tokens prefill will
        compute once shared prefixes are counted once), size the KV cache (for all of them, for a
        stream the whole budget, for scored requests two passes' worth: see scoring_blocks), and
        admit them in the scheduler's order."""
        order = admission_order(first, self.blocks)
        job = job_sharing([with_digests(with_samples(s), self.blocks) for s in order], self.blocks)
        # a scored request is planned as one new token: its prefill's logits are its output
        plan = self.settings(job.prompt_lens, max(max(s.max_new_tokens for s in first), 1), job.computed_tokens)
        planned = self.stats.plan.plan
        on_device = getattr(planned, "attention", "cpu") == "device"    # the planner found room for it
        blocks = job.blocks if whole else self.max_blocks
        if all(s.continuation is not None for s in first):
            blocks = scoring_blocks(order, self.blocks, plan["max_batch"], plan["max_prefill_tokens"])
        self.reserve_kv(blocks, self.device if on_device else "cpu")
        scheduler = Scheduler(self.blocks, plan["max_batch"], plan["max_prefill_tokens"], self.eos_ids, self.tokenizer)
        scheduler.add_sorted(order)
        return scheduler

    def _serve(self, scheduler: Scheduler, seqs, refill: int, bar):
        """The step loop: pull more when fewer than a global batch wait, step, postprocess; yields
        each sequence as it finishes. Stats count the call's sequences at its end, in input order."""
        sampler, generated, t0 = Sampler(), 0, time.perf_counter()
        try:
            while True:
                if len(scheduler.waiting) < scheduler.max_batch:
                    scheduler.add_sorted(islice(seqs, refill))
                if scheduler.done:
                    break
                phase, batch = scheduler.schedule()
                finished = scheduler.postprocess(batch, self.step(phase, batch, sampler))
                generated += sum(s.continuation is None for s in batch)
                if generated:
                    bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - t0):.1f}", batch=len(scheduler.running))
                for seq in finished:
                    sampler.forget(seq)
                    yield seq
        finally:
            scheduler.abandon()           # an error or an early close: the next call finds every block free
            bar.close()
            self.stats.add_sequences(*scheduler.served_lens())

    def _request_done(self, seq: Sequence, unfinished: dict) -> Completion | None:
        """The request's Completion once its last sample finished (n > 1: with every sample in
        `samples`), else None; unfinished holds the samples done so far, by request."""
        if seq.params.n == 1:
            return self.completion(seq)
        samples = unfinished.setdefault(seq.seq_id, {})
        samples[seq.sample] = self.completion(seq)
        if len(samples) < seq.params.n:
            return None
        del unfinished[seq.seq_id]
        return Completion.of_samples([samples[j] for j in range(seq.params.n)])

    def _sequences(self, prompts, params, truncate: str | None, indices):
        """Sequences for prompts, encoded lazily (an iterable is read only as far as it is pulled)."""
        per_prompt = params if isinstance(params, (list, Iterator)) else repeat(params)
        if isinstance(params, list) and not isinstance(prompts, (list, tuple)):
            raise InputError("one SamplingParams per prompt needs the prompts as a list (or an iterator of them "
                             "beside an iterable of prompts)")
        if isinstance(params, list) and len(params) != len(prompts):
            raise InputError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        for i, p, sp in zip(count() if indices is None else indices, prompts, per_prompt):
            check_logprob_counts(sp, self.model.vocab_size, f"prompt {i}")
            yield Sequence(i, self.encode(p, i, sp.max_new_tokens, truncate), sp)

    def chat(self, conversations, params: SamplingParams | list[SamplingParams] | None = None,
             progress: bool = False, truncate: str | None = None) -> list[Completion]:
        """Completions for conversations (lists of {"role", "content"} messages), each rendered by
        the checkpoint's chat template with the assistant's turn opened, in input order."""
        if self.tokenizer is None:
            raise InputError("chat needs the checkpoint's tokenizer and chat template; this engine has no tokenizer")
        prompts = [self.tokenizer.apply_chat_template(c, f"conversation {i}") for i, c in enumerate(conversations)]
        return self.generate(prompts, params, progress=progress, truncate=truncate)

    def reserve_kv(self, blocks_wanted: int, device="cpu") -> None:
        """Make the KV cache hold min(blocks_wanted, budget) blocks on `device` (host memory, or
        the engine's device when the planner put decode attention there), between calls, when no
        sequence holds blocks; so a small job never takes the whole budget."""
        want = min(blocks_wanted, self.max_blocks)
        if want <= self.blocks.num_blocks and self.cache.device == torch.device(device):
            return
        self.blocks = self.runner.blocks = BlockManager(want, self.config.block_size, self.config.prefix_caching)
        self.cache = self.runner.cache = None   # free the old cache before allocating the new one
        # pageable, exact size: pinned memory would round each layer's tensor up to a power of two, and
        # decode's transfers go through the runner's small pinned staging buffers instead
        self.cache = self.runner.cache = PagedKVCache(self.model, want, self.config.block_size, self.model.dtype,
                                                      device)

    # --- planning -------------------------------------------------------------------------------
    def settings(self, prompt_lens: list[int], max_new_tokens: int, computed_tokens: int | None = None) -> dict:
        """G, A and the prefill token budget for a call: what the config fixes, the planner's
        choice for the rest, else the policy's fallback. Recorded, with the plan, in stats.plan.
        computed_tokens: the prompt tokens prefill will compute (shared prefixes once); default all."""
        fixed = {k: getattr(self.config, k) for k in PLANNED if getattr(self.config, k) is not None}
        used = call_plan(fixed)
        if len(fixed) < len(PLANNED):
            try:
                used = call_plan(fixed, *self._plan(prompt_lens, max_new_tokens, fixed, computed_tokens))
            except (MoegenError, torch.cuda.OutOfMemoryError) as e:   # the probe may not fit beside the weights
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                log.warning("planner unavailable (%s); using defaults %s", e, FALLBACK_SETTINGS)
        self.stats.plan = used
        self.runner.attn_micro_batch = used.settings["attn_micro_batch"]
        return dict(used.settings)

    def _plan(self, prompt_lens, max_new_tokens, fixed, computed_tokens=None):
        """(plan, prediction) from the planner, for this call's shape within this engine's KV cache."""
        job = JobShape.from_lengths(prompt_lens, max_new_tokens, dtype_name(self.model.dtype), computed_tokens,
                                    experts_int8=self.config.experts_kernel == "int8")
        kv_bytes = self.max_blocks * self.blocks.block_size * kv_bytes_per_token(self.model, self.model.dtype)
        overrides = {**fixed, "kv_cache_bytes": kv_bytes, "block_size": self.blocks.block_size}
        if self.device_budget_bytes is not None:    # plan in this engine's device budget, as it is laid out
            overrides.update(device_memory_bytes=self.device_budget_bytes, num_buffers=self.num_buffers,
                             resident_bytes=self.streamer.resident_bytes, expert_chunk=self.config.expert_chunk)
        if self.layout is not None:     # plan within the host budget, and with the disk tier as laid out
            overrides["host_memory_bytes"] = self.layout.budget_bytes
            if self.layout.disk:     # on a GPU resident_bytes is the device's: the host's is host_resident_bytes
                overrides.update({"host_resident_bytes" if self.device.type == "cuda" else "resident_bytes":
                                  self.layout.resident_bytes, "num_buffers": self.num_buffers})
        return self.planner.plan(self.model.config, job, overrides)

    def reset_stats(self) -> None:
        self.stats = self.runner.stats = EngineStats(attention=self.stats.attention)
        self.streamer.reset_stats()

    def step(self, phase: str, batch, sampler) -> list:
        """One pass over the batch: per sequence its output, a token id (a scored request's:
        its (log-likelihood, greedy) score)."""
        t0, experts0 = time.perf_counter(), self.stats.experts_run
        states = None
        if phase == "prefill" and any(s.wants_prompt_states for s in batch):
            logits, states = self.runner.prefill_with_prompt_states(batch, [s.wants_prompt_states for s in batch])
            record_prompt_logprobs(batch, states, self.runner.logits)
        else:
            logits = self.runner.prefill(batch) if phase == "prefill" else self.runner.decode(batch)
        outputs = step_outputs(batch, logits, states, sampler, self.runner.logits)
        if self.layout is not None and self.layout.disk:
            # the disk tier keeps the most used experts resident, as routing so far says
            self.streamer.admit_most_used(max_swaps=SWAPS_PER_PASS)
        dt = time.perf_counter() - t0
        size = sum(q.prefill_tokens for q in batch) if phase == "prefill" else len(batch)
        self.stats.add_pass(phase, size, dt, self.stats.experts_run - experts0)
        return outputs

    @property
    def eos_ids(self) -> tuple:
        """Every id that ends generation: the tokenizer's and generation_config.json's (as vLLM
        stops on both), else config.json's."""
        ids = tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else ()
        ids += tuple(i for i in self.generation_defaults.eos_token_ids if i not in ids)
        return ids or eos_ids(getattr(self.model.config, "eos_token_id", None))

    def completion(self, seq: Sequence) -> Completion:
        text = seq.text if seq.text is not None else (self.tokenizer.decode(seq.output) if self.tokenizer else "")
        return Completion(seq.seq_id, seq.prompt, seq.output, text, seq.finish_reason or "length",
                          seq.logprobs.output if seq.params.logprobs is not None else None, seq.logprobs.prompt,
                          sample=seq.sample)

    # --- scoring -------------------------------------------------------------------------------
    def loglikelihood(self, requests, progress: bool = False) -> list[tuple[float, bool]]:
        """For (context ids, continuation ids) pairs: (sum of log p(continuation | context),
        whether greedy decoding would have produced the continuation). Each request is a
        sequence the scheduler admits and prefills (no token generated); with prefix caching the
        continuations of one context share its KV blocks, computed once."""
        seqs = scoring_sequences(requests, self.max_model_len)
        if not seqs:
            return []
        results = [None] * len(seqs)
        bar = tqdm(total=len(seqs), desc="loglikelihood", disable=not progress, dynamic_ncols=True)
        for seq in self._serve(self._scheduler_for(seqs, True), iter(()), 0, bar):
            results[seq.seq_id] = seq.score
            bar.update(1)
        return results
