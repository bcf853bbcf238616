"""The Engine: admission -> prefill / decode steps over the global batch -> sampling -> stops."""
import logging
import math
import time
from itertools import count, islice, repeat

import torch
from tqdm.auto import tqdm

from moegen.engine.block_manager import BlockManager
from moegen.engine.config import EngineConfig, check_machine, engine_config
from moegen.engine.disk_tier import DiskBackend, HostLayout, host_layout, is_skeleton
from moegen.engine.kv_cache import PagedKVCache, kv_bytes_per_token
from moegen.engine.memory import host_memory_bytes
from moegen.engine.params import Completion, GenerationDefaults, SamplingParams
from moegen.engine.runner import Runner
from moegen.engine.sampler import Sampler, check_logprob_counts, record_prompt_logprobs
from moegen.engine.scheduler import (Scheduler, Sequence, admission_order, job_sharing, scoring_blocks, with_digests,
                                     with_samples)
from moegen.engine.scoring import scoring_sequences, step_outputs
from moegen.engine.stats import EngineStats
from moegen.engine.stops import eos_ids
from moegen.engine.weight_stream import (CudaBackend, ResidentBackend, StagedBackend, WeightStreamer, group_weights,
                                         module_bytes)
from moegen.dtypes import dtype_name
from moegen.errors import CapacityError, InputError, MoegenError, TokenizerError
from moegen.layers.linear import packing_supported, prepack
from moegen.layers.quantized import is_quantized
from moegen.ops.attention import attention_impl
from moegen.planner.cost_model import JobShape
from moegen.planner.measured import MeasuredPlanner
from moegen.planner.memory import activation_bytes, engine_activation_reserve, format_bytes
from moegen.planner.model_spec import ModelSpec
from moegen.planner.policy import (DEFAULT_MAX_BATCH, DEFAULT_MAX_PREFILL_TOKENS, FALLBACK_SETTINGS, HOST_RESERVE_BYTES,
                                   PLANNED, call_plan, choose_resident, default_device_budget_bytes,
                                   default_kv_cache_bytes, device_reserve_bytes, disk_pool_bytes)


log = logging.getLogger("moegen")
DEQUANT_TEMPORARIES = 3    # float32 copies of a weight alive while it is dequantized (values, scales, result)
WINDOW = 1024     # prompts generate_iter pulls from an iterable at a time (a few global batches)


def device_reserve(model, config: EngineConfig, budget_bytes: int) -> int:
    """What a CUDA engine keeps back from weights in a device budget: the CUDA context and
    fragmentation (policy), the largest pass of its settings (the config's, else the fallback's)
    and the float32 temporaries of dequantizing its largest quantized weight at a GEMM."""
    act = engine_activation_reserve(ModelSpec.from_config(model.config), model.dtype.itemsize,
                                    config.max_batch or FALLBACK_SETTINGS["max_batch"],
                                    config.max_prefill_tokens or FALLBACK_SETTINGS["max_prefill_tokens"],
                                    config.expert_chunk)
    quantized = [math.prod(w.shape) for w in model.weights.values() if is_quantized(w)]
    return device_reserve_bytes(budget_bytes) + act + DEQUANT_TEMPORARIES * 4 * max(quantized, default=0)


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
        self.layout = self._host_layout(block_bytes)       # None: no host budget, every weight in memory
        disk = self.model.checkpoint.path if self.layout is not None and self.layout.disk else None
        self.planner = planner or MeasuredPlanner(str(self.device), disk)   # probes on first use only
        self.device_budget_bytes = None         # a streaming engine's device budget (see _resident_modules)
        self.streamer = self._make_streamer()
        budget = self.layout.kv_bytes if self.layout else self._kv_budget_bytes()
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
        from moegen.tokenizer import load_tokenizer
        cfg = engine_config(device, host_memory, device_memory, kw)   # bad settings fail before a long load
        defaults = GenerationDefaults.read(path)
        model = Checkpoint(path, dtype).model     # weights read by the engine: all, or what host_memory holds
        try:
            tokenizer = load_tokenizer(path)
        except TokenizerError as err:     # token-id prompts still work; text prompts get a clear error
            log.warning("%s; the engine takes token ids only", err)
            tokenizer = None
        return cls(model, tokenizer, cfg, generation_defaults=defaults)

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

    def _host_layout(self, block_bytes: int) -> HostLayout | None:
        """How host_memory is spent (moegen.engine.disk_tier.host_layout), checked before any weight
        is read; None without a budget (every weight in memory, as loaded)."""
        cfg, weights = self.config, self.model.weights
        if cfg.host_memory_bytes is None:
            return None
        sizes = {k: module_bytes(g) for k, g in group_weights(weights).items()}
        pool = disk_pool_bytes(cfg.num_buffers, max((v for k, v in sizes.items() if k != "model"), default=0),
                               self._packs())
        spec = ModelSpec.from_model(self.model)
        tokens = cfg.max_prefill_tokens or DEFAULT_MAX_PREFILL_TOKENS
        act = activation_bytes(spec, tokens, min(tokens, DEFAULT_MAX_BATCH), tokens, self.model.dtype.itemsize, True)
        layout = host_layout(sizes, cfg.host_memory_bytes, cfg.kv_cache_bytes, pool, act, HOST_RESERVE_BYTES,
                             block_bytes)
        if layout.disk and self.model.checkpoint is None:
            raise CapacityError(f"{layout.describe()}; but this model's weights were made or loaded whole in "
                                "memory: open it with Engine.from_pretrained to stream them from its files")
        if layout.disk and (self.device.type != "cpu" or cfg.streaming == "resident"):
            raise InputError(f"{layout.describe()}: the disk tier streams to the CPU (device cpu, streaming "
                             "auto or staged); give a host_memory that holds the model")
        log.info("%s", layout.describe())
        return layout

    def _packs(self) -> bool:
        """Whether GEMM weights get oneDNN's layout (prepack; with the disk tier, after each read)."""
        return self.config.prepack is not False and packing_supported(self.model.dtype)

    def _make_streamer(self) -> WeightStreamer:
        cfg, weights = self.config, self.model.weights
        checkpoint = self.model.checkpoint
        if self.layout is not None and self.layout.disk:
            groups = group_weights(weights)
            todo = [n for k in self.layout.resident for n, w in groups[k].items() if is_skeleton(w)]
            # plain GEMM weights packed straight from the mapped files (each one's pages handed back
            # as it is packed: a copy first would hold the resident weights twice); the rest copied
            # in, so resident weights never depend on the files again. Streamed ones the reader packs.
            packed = {n for n in self.model.linear_weight_names()
                      if self._packs() and isinstance(weights[n], torch.Tensor)} & set(todo)
            checkpoint.load(sorted(packed))
            if packed:
                self._prepack(weights)
            checkpoint.load([n for n in todo if n not in packed], own=True)
            return WeightStreamer(weights, DiskBackend(checkpoint, pack=self._packs()),
                                  resident=set(self.layout.resident), num_buffers=cfg.num_buffers)
        if checkpoint is not None:            # opened lazily (from_pretrained): read what is not yet
            checkpoint.load([n for n, w in weights.items() if is_skeleton(w)])
        streams = self.device.type == "cuda" or cfg.streaming == "staged"
        if streams and (any(t.is_mkldnn for t in weights.values()) or self._fused_layers()):
            raise InputError("this model's weights were packed for CPU GEMMs by another Engine (prepack, or the "
                             "fused experts kernel); load the model again for a streaming engine, or build the "
                             "first with prepack=False, experts_kernel='torch'")
        if streams:
            from moegen.loader import MappedPages
            backend = CudaBackend(self.device) if self.device.type == "cuda" else StagedBackend()
            groups = group_weights(weights)
            resident = set(groups) if cfg.streaming == "resident" else self._resident_modules(groups)
            return WeightStreamer(weights, backend, resident, cfg.num_buffers, release=MappedPages())
        self._fuse_experts(weights)
        if cfg.prepack is not False:
            self._prepack(weights)
        return WeightStreamer(weights, ResidentBackend())

    def _resident_modules(self, groups) -> set:
        """The modules kept on the device: the embeddings and lm_head always, then what fits
        (policy.choose_resident) in the device budget less its reserve (CUDA context, the
        activations of the largest pass, dequantization temporaries) and the buffer pool. The
        planner plans in the same budget with the same buffers (_plan). Staged (a CPU stand-in)
        keeps only the top resident unless given a device_memory, and reserves nothing."""
        cfg = self.config
        sizes = {k: module_bytes(g) for k, g in groups.items()}
        pool = cfg.num_buffers * max((v for k, v in sizes.items() if k != "model"), default=0)
        if self.device.type == "cuda":
            budget = cfg.device_memory or default_device_budget_bytes(torch.cuda.mem_get_info(self.device)[0])
            reserve = device_reserve(self.model, cfg, budget)
        elif cfg.device_memory is None:
            return {"model"}
        else:
            budget, reserve = cfg.device_memory, 0
        self.device_budget_bytes = budget
        spare = budget - reserve - sizes["model"] - pool      # embeddings and lm_head always stay on the device
        if spare < 0:
            raise InputError(f"device memory budget {format_bytes(budget)} cannot hold the embeddings and lm_head "
                             f"({format_bytes(sizes['model'])}) plus {cfg.num_buffers} streaming buffers "
                             f"({format_bytes(pool)}) and its reserve ({format_bytes(reserve)}): "
                             f"{format_bytes(-spare)} short")
        rest = {k: g for k, g in groups.items() if k != "model"}
        return choose_resident(rest, sizes, spare) | {"model"}

    def _kv_budget_bytes(self) -> int:
        """The KV cache's cap: the config's, else the policy's share of RAM. With weights streamed
        from host memory, their host copies and the KV cache must fit RAM together: an unset
        budget shrinks to what is left, a set one that does not fit is refused."""
        ram, cfg = host_memory_bytes(), self.config
        budget = cfg.kv_cache_bytes or default_kv_cache_bytes(ram)
        if not self.streamer.backend.streams:
            return budget
        held = self.streamer.host_bytes
        room = ram - held - HOST_RESERVE_BYTES
        if budget <= room:
            return budget
        if cfg.kv_cache_bytes is not None:
            raise CapacityError(f"host memory: the streamed weights' host copy ({format_bytes(held)}) and a KV cache of "
                                f"{format_bytes(budget)} need more than this machine's {format_bytes(ram)} (less "
                                f"{format_bytes(HOST_RESERVE_BYTES)} for the runtime); give host_memory at most "
                                f"{format_bytes(max(room, 0))}")
        log.warning("KV cache budget %s (the default share of RAM) shrunk to %s: the streamed weights hold %s of %s",
                    format_bytes(budget), format_bytes(max(room, 0)), format_bytes(held), format_bytes(ram))
        return max(room, 0)

    def _moe_layers(self):
        return [layer.ffn for layer in self.model.layers if layer.is_moe]

    def _fused_layers(self):
        return [moe for moe in self._moe_layers() if moe.fused_names()[0] in self.model.weights]

    def _fuse_experts(self, weights) -> None:
        """Routed experts packed for the fused kernel (moegen.ops.experts), where it runs."""
        from moegen.ops.experts import auto_isa, chosen_isa
        wanted = self.config.experts_kernel
        if wanted == "torch":
            if self._fused_layers():
                raise InputError("this model's experts were packed for the fused kernel by another Engine; "
                                 "load the model again for experts_kernel=torch")
            return
        done = {moe.prefix for moe in self._fused_layers()}
        todo = [moe for moe in self._moe_layers() if moe.prefix not in done]
        # auto: only with AMX (elsewhere oneDNN's per-expert GEMMs are the faster path)
        isa = chosen_isa() if wanted == "fused" else auto_isa()
        fits = all(moe.can_fuse(weights, self.model.dtype) for moe in todo)
        if isa is None or not fits:
            if wanted == "fused":
                raise InputError("experts_kernel=fused: " + ("the native kernels are unavailable" if isa is None else
                                 f"it runs SiLU experts in bfloat16 models (weights bf16, fp8 or int8/int4 "
                                 f"with groups of 32 inputs), not these ({self.model.dtype})"))
            return
        from moegen.loader import MappedPages
        t0, release = time.perf_counter(), MappedPages()
        for moe in todo:
            moe.pack_fused(weights, release=release)
        log.info("packed the experts of %d MoE layers for the fused %s kernel in %.1f s", len(todo), isa,
                 time.perf_counter() - t0)

    def _prepack(self, weights) -> None:
        if not packing_supported(self.model.dtype):
            if self.config.prepack:
                raise InputError(f"prepack=True needs oneDNN {self.model.dtype} GEMMs, which this CPU/torch lacks")
            return
        from moegen.loader import MappedPages
        t0 = time.perf_counter()
        # each plain weight's checkpoint pages go back as soon as its packed copy exists
        n = prepack(weights, self.model.linear_weight_names(), release=MappedPages())
        log.info("packed %d GEMM weights for oneDNN in %.1f s", n, time.perf_counter() - t0)

    # --- inputs --------------------------------------------------------------------------------
    def encode(self, prompt, index: int, max_new_tokens: int, truncate: str | None) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InputError(f"prompt {index} is empty")
            if self.tokenizer is None:
                raise InputError(f"prompt {index} is text but the engine has no tokenizer")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise InputError(f"prompt {index} must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InputError(f"prompt {index} is empty")
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise InputError(f"prompt {index} has token ids outside the vocabulary [0, {self.model.vocab_size}): {bad[:5]}")
        room = self.max_model_len - max_new_tokens
        if len(ids) > room:
            if truncate != "left" or room < 1:
                raise InputError(f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} the "
                                 f"model's context of {self.max_model_len} leaves room for {max(room, 0)} "
                                 f"(truncate='left' keeps the last tokens)")
            ids = ids[-room:]
        return ids

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
        SamplingParams, or a list with one per prompt of a list. indices: each prompt's index
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
        per_prompt = params if isinstance(params, list) else repeat(params)
        if isinstance(params, list) and not isinstance(prompts, (list, tuple)):
            raise InputError("one SamplingParams per prompt needs the prompts as a list")
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
        job = JobShape.from_lengths(prompt_lens, max_new_tokens, dtype_name(self.model.dtype), computed_tokens)
        kv_bytes = self.max_blocks * self.blocks.block_size * kv_bytes_per_token(self.model, self.model.dtype)
        overrides = {**fixed, "kv_cache_bytes": kv_bytes, "block_size": self.blocks.block_size}
        if self.device_budget_bytes is not None:    # plan in this engine's device budget, as it is laid out
            overrides.update(device_memory_bytes=self.device_budget_bytes, num_buffers=self.config.num_buffers,
                             resident_bytes=self.streamer.resident_bytes, expert_chunk=self.config.expert_chunk)
        if self.layout is not None:     # plan within the host budget, and with the disk tier as laid out
            overrides["host_memory_bytes"] = self.layout.budget_bytes
            if self.layout.disk:
                overrides.update(resident_bytes=self.layout.resident_bytes, num_buffers=self.config.num_buffers)
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
