"""The Engine: admission -> prefill / decode steps over the global batch -> sampling -> stops."""
import logging
import time

import torch
from tqdm.auto import tqdm

from moegen.engine.block_manager import BlockManager
from moegen.engine.config import EngineConfig, engine_config
from moegen.engine.kv_cache import PagedKVCache, kv_bytes_per_token
from moegen.engine.memory import choose_resident, host_memory_bytes
from moegen.engine.params import Completion, SamplingParams
from moegen.engine.runner import Runner
from moegen.engine.sampler import Sampler
from moegen.engine.scheduler import Scheduler, Sequence
from moegen.engine.stats import EngineStats, RunRecord
from moegen.engine.weight_stream import CudaBackend, ResidentBackend, StagedBackend, WeightStreamer, group_weights, module_bytes
from moegen.dtypes import dtype_name
from moegen.errors import InputError, MoegenError, TokenizerError
from moegen.layers.attention import RaggedContext
from moegen.layers.linear import packing_supported, prepack
from moegen.ops.attention import attention_impl


log = logging.getLogger("moegen")
PLANNED = ("max_batch", "attn_micro_batch", "max_prefill_tokens")
FALLBACK_PLAN = {"max_batch": 256, "attn_micro_batch": 32, "max_prefill_tokens": 8192}


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, **overrides):
        self.model, self.tokenizer = model, tokenizer
        self.config = cfg = config or EngineConfig(**overrides)
        self.device = torch.device(cfg.device)
        self.max_model_len = cfg.max_model_len or getattr(model.config, "max_position_embeddings", 1 << 20)
        per_token = kv_bytes_per_token(model, model.dtype)
        budget = cfg.kv_cache_bytes or host_memory_bytes() // 4
        # the budget caps the cache; it is allocated (and grown) only as far as calls need it
        self.max_blocks = max(1, budget // (per_token * cfg.block_size))
        self.blocks = BlockManager(1, cfg.block_size)
        self.cache = PagedKVCache(model, 1, cfg.block_size, model.dtype)
        self.streamer = self._make_streamer()
        self.stats = EngineStats(attention=attention_impl())
        self._eos = self.eos_ids
        self.runner = Runner(model, self.cache, self.blocks, self.streamer, self.device,
                             cfg.attn_micro_batch, cfg.expert_chunk, self.stats)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype="bfloat16", host_memory=None, device_memory=None, **kw):
        """Load a HF checkpoint directory. host_memory: bytes (or "8GB") for the KV cache;
        device_memory: device budget for resident weights and streaming buffers."""
        from moegen.loader import load_model
        from moegen.tokenizer import load_tokenizer
        model = load_model(path, dtype)
        cfg = engine_config(device, host_memory, device_memory, kw)
        try:
            tokenizer = load_tokenizer(path)
        except TokenizerError as err:     # token-id prompts still work; text prompts get a clear error
            log.warning("%s; the engine takes token ids only", err)
            tokenizer = None
        return cls(model, tokenizer, cfg)

    @classmethod
    def from_config(cls, config, dummy_weights=True, device="cpu", dtype="bfloat16", host_memory=None,
                    device_memory=None, seed: int = 0, **kw):
        """An engine over random weights of a config's shapes (config object, dict, config.json,
        or a bundled name such as "deepseek-v2-lite"); no tokenizer, so prompts are token ids."""
        from moegen.errors import ConfigError
        from moegen.loader import dummy_model
        if not dummy_weights:
            raise ConfigError("Engine.from_config needs dummy_weights=True; use from_pretrained for real weights")
        return cls(dummy_model(config, dtype, seed), None, engine_config(device, host_memory, device_memory, kw))

    def _make_streamer(self) -> WeightStreamer:
        cfg, weights = self.config, self.model.weights
        streams = self.device.type == "cuda" or cfg.streaming == "staged"
        if streams and any(t.is_mkldnn for t in weights.values()):
            raise InputError("this model's weights were packed for CPU GEMMs by another Engine (prepack); "
                             "load the model again for a streaming engine, or build the first with prepack=False")
        if self.device.type == "cuda":
            if cfg.streaming == "resident":
                return WeightStreamer(weights, CudaBackend(self.device), resident=set(group_weights(weights)))
            weights = {n: t.pin_memory() for n, t in weights.items()}
            self.model.weights = weights
            groups = group_weights(weights)
            sizes = {k: module_bytes(g) for k, g in groups.items()}
            pool = cfg.num_buffers * max(v for k, v in sizes.items() if k != "model")
            budget = cfg.device_memory or int(torch.cuda.mem_get_info(self.device)[0] * 0.8)
            spare = budget - sizes["model"] - pool      # embeddings and lm_head always stay on the device
            if spare < 0:
                raise InputError(f"device memory budget {budget / 2**20:.1f} MiB cannot hold the embeddings and "
                                 f"lm_head ({sizes['model'] / 2**20:.1f} MiB) plus {cfg.num_buffers} streaming "
                                 f"buffers ({pool / 2**20:.1f} MiB): {-spare / 2**20:.1f} MiB short")
            rest = {k: g for k, g in groups.items() if k != "model"}
            resident = choose_resident(rest, sizes, spare) | {"model"}
            return WeightStreamer(weights, CudaBackend(self.device), resident=resident, num_buffers=cfg.num_buffers)
        if cfg.streaming == "staged":
            return WeightStreamer(weights, StagedBackend(), resident={"model"}, num_buffers=cfg.num_buffers)
        if cfg.prepack is not False:
            self._prepack(weights)
        return WeightStreamer(weights, ResidentBackend())

    def _prepack(self, weights) -> None:
        if not packing_supported(self.model.dtype):
            if self.config.prepack:
                raise InputError(f"prepack=True needs oneDNN {self.model.dtype} GEMMs, which this CPU/torch lacks")
            return
        t0 = time.perf_counter()
        n = prepack(weights, self.model.linear_weight_names())
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
        params = params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise InputError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        seqs = [Sequence(i, self.encode(p, i, sp.max_new_tokens, truncate), sp)
                for i, (p, sp) in enumerate(zip(prompts, per_prompt))]
        plan = self.settings([len(s.prompt) for s in seqs], max(sp.max_new_tokens for sp in per_prompt))
        self.reserve_kv(sum(self.blocks.blocks_for(s.max_length) for s in seqs))
        scheduler = Scheduler(self.blocks, plan["max_batch"], plan["max_prefill_tokens"])
        # longest first: memory problems surface at once, and similar lengths decode together
        for seq in sorted(seqs, key=lambda s: -s.max_length):
            scheduler.add(seq)
        sampler = Sampler()
        self._eos = self.eos_ids          # once per call: append_token runs for every token
        bar = tqdm(total=len(seqs), desc="generate", unit="seq", disable=not progress, dynamic_ncols=True)
        generated, t0 = 0, time.perf_counter()
        while not scheduler.done:
            phase, batch = scheduler.schedule()
            tokens = self.step(phase, batch, sampler)
            for seq, tok in zip(batch, tokens):
                self.append_token(seq, tok)
            generated += len(batch)
            for seq in scheduler.retire_finished():
                sampler.forget(seq)
                bar.update(1)
            bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - t0):.1f}", batch=len(scheduler.running))
        bar.close()
        return [self.completion(s) for s in seqs]

    def reserve_kv(self, blocks_wanted: int) -> None:
        """Make the KV cache hold min(blocks_wanted, budget) blocks (between calls, when no
        sequence holds blocks), so a small job never pins the whole budget."""
        want = min(blocks_wanted, self.max_blocks)
        if want <= self.blocks.num_blocks:
            return
        self.blocks = self.runner.blocks = BlockManager(want, self.config.block_size)
        self.cache = self.runner.cache = None   # free the old cache before allocating the new one
        self.cache = self.runner.cache = PagedKVCache(self.model, want, self.config.block_size, self.model.dtype,
                                                      pin=self.device.type == "cuda")

    # --- planning -------------------------------------------------------------------------------
    def settings(self, prompt_lens: list[int], max_new_tokens: int) -> dict:
        """G, A and the prefill token budget for a call: what the config fixes, the planner's
        choice for the rest (from this machine's cached probe), else safe defaults."""
        fixed = {k: getattr(self.config, k) for k in PLANNED if getattr(self.config, k) is not None}
        chosen = dict(FALLBACK_PLAN)
        self.last_plan = None
        if len(fixed) < len(PLANNED):
            try:
                chosen, self.last_plan = self._plan(prompt_lens, max_new_tokens, fixed)
            except MoegenError as e:
                log.warning("planner unavailable (%s); using defaults %s", e, FALLBACK_PLAN)
        settings = {**chosen, **fixed}
        self.runner.attn_micro_batch = settings["attn_micro_batch"]
        return settings

    def _plan(self, prompt_lens, max_new_tokens, fixed):
        from moegen.planner.cost_model import Hardware, Workload
        from moegen.planner.model_spec import ModelSpec
        from moegen.planner.probe import default_cache_path, probe
        from moegen.planner.search import search
        if not default_cache_path(self.device.type).exists():
            log.warning("measuring this machine once for the planner (cached in %s)", default_cache_path(self.device.type))
        hw = Hardware.from_probe(probe(self.device.type))
        dtype = dtype_name(self.model.dtype)
        workload = Workload(prompt_len=max(1, round(sum(prompt_lens) / len(prompt_lens))), gen_len=max_new_tokens,
                            num_sequences=len(prompt_lens), dtype=dtype)
        kv_bytes = self.max_blocks * self.blocks.block_size * kv_bytes_per_token(self.model, self.model.dtype)
        plan, prediction = search(ModelSpec.from_config(self.model.config), hw, workload,
                                  overrides={**fixed, "kv_cache_bytes": kv_bytes, "block_size": self.blocks.block_size})
        return {k: getattr(plan, k) for k in PLANNED}, (plan, prediction)

    def reset_stats(self) -> None:
        self.stats = self.runner.stats = EngineStats(attention=self.stats.attention)
        self.streamer.stats.reset()

    def run_record(self, completions, wall_s: float | None = None):
        """The accounting record of the last generate() since reset_stats()."""
        s = self.stats
        return RunRecord(prompt_lens=[c.num_prompt_tokens for c in completions],
                         gen_lens=[len(c.token_ids) for c in completions], prefill_s=s.prefill_s,
                         decode_s=s.decode_s, wall_s=wall_s, prefill_pass_tokens=s.prefill_pass_tokens,
                         decode_step_seqs=s.decode_step_seqs, prefill_distinct_experts=s.prefill_distinct_experts,
                         decode_distinct_experts=s.decode_distinct_experts)

    def step(self, phase: str, batch, sampler) -> list[int]:
        t0, experts0 = time.perf_counter(), self.stats.experts_run
        logits = self.runner.prefill(batch) if phase == "prefill" else self.runner.decode(batch)
        tokens = sampler.sample(logits, batch)
        dt = time.perf_counter() - t0
        s, experts = self.stats, self.stats.experts_run - experts0
        if phase == "prefill":
            tokens_in = sum(len(q.prompt) for q in batch)
            s.prefill_tokens += tokens_in
            s.prefill_s += dt
            s.prefill_pass_tokens.append(tokens_in)
            s.prefill_distinct_experts += experts
        else:
            s.decode_s += dt
            s.decode_step_seqs.append(len(batch))
            s.decode_distinct_experts += experts
        return tokens

    def append_token(self, seq: Sequence, token: int) -> None:
        p = seq.params
        seq.output.append(token)
        if (not p.ignore_eos and token in self._eos) or token in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif p.stop and self.tokenizer is not None and self._hit_stop_string(seq):
            seq.finish_reason = "stop"
        elif len(seq.output) >= p.max_new_tokens:
            seq.finish_reason = "length"

    @property
    def eos_ids(self) -> tuple:
        """Every id that ends generation: the tokenizer's, else config.json's."""
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            return tuple(self.tokenizer.eos_token_ids)
        return eos_ids(getattr(self.model.config, "eos_token_id", None))

    def _hit_stop_string(self, seq) -> bool:
        # a stop string of L characters spans at most L tokens: look at the tail only
        window = max(len(s) for s in seq.params.stop) + 2
        tail = self.tokenizer.decode(seq.output[-window:])
        if not any(s in tail for s in seq.params.stop):
            return False
        text = self.tokenizer.decode(seq.output)
        cut = min((text.find(s) for s in seq.params.stop if s in text), default=-1)
        if cut < 0:
            return False
        seq.text = text[:cut]
        return True

    def completion(self, seq: Sequence) -> Completion:
        text = seq.text if seq.text is not None else (self.tokenizer.decode(seq.output) if self.tokenizer else "")
        return Completion(seq.seq_id, seq.prompt, seq.output, text, seq.finish_reason or "length")

    # --- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, requests, progress: bool = False) -> list[tuple[float, bool]]:
        """For (context ids, continuation ids) pairs: (sum of log p(continuation | context),
        whether greedy decoding would have produced the continuation). Batched prefill, no KV."""
        items = []
        for i, (ctx, cont) in enumerate(requests):
            ctx, cont = list(ctx), list(cont)
            if not ctx or not cont:
                raise InputError(f"request {i}: context and continuation must both be non-empty")
            if len(ctx) + len(cont) - 1 > self.max_model_len:
                raise InputError(f"request {i} has {len(ctx) + len(cont)} tokens; the model's context is {self.max_model_len}")
            items.append((i, ctx + cont[:-1], cont))
        items.sort(key=lambda it: -len(it[1]))
        plan = self.settings([len(it[1]) for it in items], 1)
        results = [None] * len(items)
        bar = tqdm(total=len(items), desc="loglikelihood", disable=not progress, dynamic_ncols=True)
        for chunk in _chunks(items, plan["max_prefill_tokens"], plan["max_batch"]):
            t0 = time.perf_counter()
            for (i, _, _), res in zip(chunk, self._score_chunk(chunk)):
                results[i] = res
            self.stats.prefill_tokens += sum(len(it[1]) for it in chunk)
            self.stats.prefill_s += time.perf_counter() - t0
            bar.update(len(chunk))
        bar.close()
        return results

    def _score_chunk(self, chunk):
        lens = [len(toks) for _, toks, _ in chunk]
        tokens = torch.tensor([t for _, toks, _ in chunk for t in toks], device=self.device)
        x = self.runner.forward(tokens, RaggedContext(lens, self.device))
        rows, offset = [], 0
        for (_, toks, cont), n in zip(chunk, lens):
            rows.append(torch.arange(offset + n - len(cont), offset + n))
            offset += n
        logprobs = torch.log_softmax(self.model.logits(x[torch.cat(rows).to(self.device)], self.runner.top).float(), -1)
        out, at = [], 0
        for _, _, cont in chunk:
            lp = logprobs[at:at + len(cont)]
            target = torch.tensor(cont, device=lp.device)
            out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
            at += len(cont)
        return out


def eos_ids(eos) -> tuple:
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def _chunks(items, max_tokens: int, max_seqs: int):
    chunk, tokens = [], 0
    for it in items:
        if chunk and (tokens + len(it[1]) > max_tokens or len(chunk) >= max_seqs):
            yield chunk
            chunk, tokens = [], 0
        chunk.append(it)
        tokens += len(it[1])
    if chunk:
        yield chunk
