"""Plan search: the engine settings that maximise predicted end-to-end tokens/s within memory.

Memory accounting (what must fit):
- host: every weight (memory-mapped on the CPU, pinned copies with CUDA) + the KV cache of G
  sequences of prompt_len + gen_len tokens (rounded up to whole blocks, as the engine admits a
  sequence only with blocks for its whole lifetime; with shared prefixes, of their computed
  prompt tokens + gen_len each, the shared blocks being held once) + activations when the CPU
  computes + a reserve for the Python/torch runtime;
- device (cuda): the resident weights (embedding/lm_head always) + num_buffers streaming buffers of
  the largest module + activations of the largest pass + a reserve for the CUDA context and
  fragmentation.
The engine fills whatever device budget is left with resident weights, dense groups first, so the
plan's resident bytes are "the rest" and `to_engine_options()` hands the engine exactly the budget
that makes it choose the same set.

Search space: G (powers of two up to the host limit, the limit itself, and the G that splits the
sequences into equal waves), prompts per prefill pass and streaming buffers; the attention
micro-batch is all of G (decode attention runs on the CPU, whose kernel wants many sequences) and
the expert chunk the largest whose working set fits. Any choice of `Plan` can be fixed through
`overrides`. The search lists the candidates, keeps those that fit both memories, and returns the
best predicted.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Mapping, NamedTuple

from moegen.planner.cost_model import JobShape, Prediction, predict
from moegen.planner.hardware import Hardware
from moegen.ops.experts import auto_isa
from moegen.planner.memory import (activation_bytes, attention_link_bytes, buffer_bytes, dense_group_bytes,
                                   format_bytes, model_group_bytes, resident_set)
from moegen.planner.model_spec import ModelSpec
from moegen.planner.plan import Plan, PlanError, plan_overrides
from moegen.planner.policy import (DEFAULT_ATTN_MICRO_BATCH, DEFAULT_BLOCK_SIZE, DEFAULT_MAX_BATCH,
                                   DEFAULT_MAX_PREFILL_TOKENS, DEFAULT_NUM_BUFFERS, HOST_RESERVE_BYTES,
                                   MIN_NUM_BUFFERS, default_device_budget_bytes, default_kv_cache_bytes,
                                   device_reserve_bytes, disk_num_buffers, disk_pool)

__all__ = ["search", "predict_for_engine", "plan_from_engine_config"]

EXPERT_WORKSET_FRACTION = 1 / 8       # an expert GEMM chain's rows may use this share of the budget
MIN_EXPERT_CHUNK = 64
NEAR_TIE = 0.01                       # predicted rates this close count as equal
BUFFER_OPTIONS = (2, 3, 4)            # streaming buffers tried on a GPU


@dataclass
class _Budget:
    """The fixed parts of both memories for one (spec, hardware, job)."""
    spec: ModelSpec
    hw: Hardware
    job: JobShape
    host_bytes: int
    device_bytes: int
    block_size: int

    def __post_init__(self):
        db = self.job.dtype_bytes
        self.weights = self.spec.weight_bytes(db)["total"]
        per_block = self.block_size * self.spec.kv_bytes_per_token(db)
        # G sequences hold G times a sequence's own KV (shared prefix blocks are held once, see
        # JobShape.kv_tokens); any one sequence still needs its whole lifetime's blocks
        self.kv_per_seq = math.ceil(self.job.kv_tokens / self.block_size) * per_block
        self.kv_one_seq = math.ceil(self.job.seq_tokens / self.block_size) * per_block
        self.cuda = self.hw.device == "cuda"
        # with a measured disk, weights host memory cannot hold stream from the files
        self.disk = self.hw.disk_read_gbps > 0
        self.buffer = buffer_bytes(self.spec, db) if self.cuda or self.disk else 0
        self.model_group = model_group_bytes(self.spec, db)
        self.device_reserve = device_reserve_bytes(self.device_bytes)
        # host memory the weights need at least: all of them, or the disk tier's embeddings + pool
        self.packed = self.job.dtype in ("bfloat16", "float16")     # the disk tier packs those for oneDNN
        # the disk tier's streamed bf16 experts run in the fused kernel where the engine takes it
        self.tiled = self.disk and not self.cuda and self.job.dtype == "bfloat16" and auto_isa() is not None
        self.expert_buffer = self.spec.expert_bytes(db) if self.spec.num_moe_layers else 0
        self.dense_bytes = sum(dense_group_bytes(self.spec, i, db) for i in range(self.spec.num_layers))
        self.host_weights = self.model_group + self.disk_pool(MIN_NUM_BUFFERS, True)[0] if self.disk else self.weights
        self.staging = self.disk_pool(0, True)[0] if self.cuda else 0     # disk -> host -> GPU: the readers' own
        self.device_usable = self.device_bytes - self.device_reserve

    def disk_pool(self, num_buffers: int, dense_resident: bool) -> tuple[int, int]:
        """(host pool, buffer) bytes as the engine sizes its pool (policy.disk_pool)."""
        return disk_pool(num_buffers, self.expert_buffer, self.buffer, self.packed and not self.cuda, self.tiled,
                         dense_resident, self.cuda)

    # working sets
    def compute_act(self, tokens: int, out_rows: int, expert_rows: int, prefill: bool) -> int:
        return activation_bytes(self.spec, tokens, out_rows, expert_rows, self.job.dtype_bytes, prefill)

    def pass_act(self, G: int, per_pass: int, chunk: int) -> int:
        """Largest working set of a prefill pass or a decode step."""
        pre_tokens = per_pass * self.job.prefill_len
        pre = self.compute_act(pre_tokens, per_pass, min(chunk or pre_tokens, pre_tokens), True)
        dec = self.compute_act(G, G, min(chunk or G, G), False)
        return max(pre, dec)

    def host_act(self, G: int, A: int, per_pass: int, chunk: int) -> int:
        if not self.cuda:
            return self.pass_act(G, per_pass, chunk)
        out_b, back_b = attention_link_bytes(self.spec, self.job.dtype_bytes)
        return int(A * (out_b + back_b) * 2)        # a micro-batch's q/k/v and output, staged

    def host_free_for_kv(self, act: int) -> int:
        return self.host_bytes - self.host_weights - HOST_RESERVE_BYTES - act

    def expert_chunk(self, tokens: int) -> int:
        """0 (all rows) if an expert GEMM chain over every token of the pass fits its share of
        memory, else the largest power of two that does (an expert may get every token)."""
        room = EXPERT_WORKSET_FRACTION * (self.device_usable if self.cuda else self.host_bytes - self.host_weights)
        per_row = self.compute_act(0, 0, 1, False)
        if tokens * per_row <= room:
            return 0
        chunk = MIN_EXPERT_CHUNK
        while chunk * 2 * per_row <= room and chunk * 2 < tokens:
            chunk *= 2
        return chunk


        chunk = MIN_EXPERT_CHUNK
        while chunk * 2 * per_row <= room and chunk * 2 < tokens:
            chunk *= 2
        return chunk


def _host_error(b: _Budget, G: int, act: int, what: str | None = None) -> PlanError:
    free = b.host_free_for_kv(act)
    need = b.kv_one_seq if G == 1 else G * b.kv_per_seq
    seqs = "one sequence" if G == 1 else f"{G} sequences"
    detail = (f"budget {format_bytes(b.host_bytes)} - weights {format_bytes(b.weights)} - activations "
              f"{format_bytes(act)} - reserve {format_bytes(HOST_RESERVE_BYTES)}")
    if free < 0:
        return PlanError(f"host memory: the weights ({format_bytes(b.weights)}), activations ({format_bytes(act)}) and "
                         f"reserve ({format_bytes(HOST_RESERVE_BYTES)}) need {format_bytes(b.host_bytes - free)}, "
                         f"the budget is {format_bytes(b.host_bytes)}; short by {format_bytes(-free + need)} "
                         f"with the KV cache of {seqs}")
    return PlanError(f"host memory: the KV cache for {seqs} of {b.job.seq_tokens} tokens needs {format_bytes(need)}, "
                     f"{format_bytes(free)} available ({detail}); short by {format_bytes(need - free)}"
                     + (f" ({what})" if what else ""))


def _device_error(b: _Budget, nb: int, act: int, resident_min: int, what: str = "") -> PlanError:
    need = resident_min + nb * b.buffer + act
    return PlanError(f"device memory: the always-resident embedding/lm_head ({format_bytes(resident_min)}) + "
                     f"{nb} streaming buffers of the largest module ({nb} x {format_bytes(b.buffer)}) + "
                     f"activations{what} ({format_bytes(act)}) need {format_bytes(need)}, "
                     f"{format_bytes(b.device_usable)} available (budget {format_bytes(b.device_bytes)} - reserve "
                     f"{format_bytes(b.device_reserve)}); short by {format_bytes(need - b.device_usable)}")


def _pow2_below(n: int) -> list[int]:
    out, p = [], 1
    while p < n:
        out.append(p)
        p *= 2
    return out


class _Candidate(NamedTuple):
    max_batch: int
    attn_micro_batch: int
    prompts_per_pass: int
    expert_chunk: int
    num_buffers: int


class _Miss(NamedTuple):
    """A candidate that does not fit: by how many bytes, and the error that says where."""
    short_bytes: int
    error: PlanError


def search(spec: ModelSpec, hw: Hardware, job: JobShape, host_memory_bytes: int | None = None,
           device_memory_bytes: int | None = None,
           overrides: Mapping[str, Any] | None = None) -> tuple[Plan, Prediction]:
    """The plan with the highest predicted end-to-end tokens/s that fits both memories.

    host_memory_bytes: what moegen may use of host memory (weights, KV cache, activations);
    default hw.host_memory_bytes. device_memory_bytes: the GPU's budget; default
    hw.device_memory_bytes. overrides: Plan choices to fix (also "G", "A").
    Raises PlanError naming the memory that is short, and by how much."""
    ov = plan_overrides(overrides)
    b = _budget(spec, hw, job, host_memory_bytes, device_memory_bytes, ov)
    min_chunk = int(ov["expert_chunk"]) if "expert_chunk" in ov else b.expert_chunk(job.prefill_len)
    _check_one_sequence_fits(b, ov, min_chunk)
    plans, misses = [], []
    for candidate in _candidates(b, ov, min_chunk):
        fit = _fits(b, ov, candidate)
        if isinstance(fit, _Miss):
            misses.append(fit)
        else:
            plans += _placements(b, ov, fit)
    if not plans:   # the closest miss says what is short
        raise min(misses, key=lambda m: m.short_bytes).error if misses else PlanError("no plan fits")
    return _best([(plan, predict(spec, hw, plan, job)) for plan in plans])


def _budget(spec: ModelSpec, hw: Hardware, job: JobShape, host_memory_bytes: int | None,
            device_memory_bytes: int | None, ov: dict) -> _Budget:
    device = str(ov.get("device", hw.device)).partition(":")[0]
    if device != hw.device:
        raise PlanError(f"device {device!r} asked for, but the hardware constants describe {hw.device!r}")
    host = int(host_memory_bytes or hw.host_memory_bytes or 0)
    if host <= 0:
        raise PlanError("host memory budget unknown: pass host_memory_bytes (or probe this machine)")
    dev = int(device_memory_bytes or hw.device_memory_bytes or 0) if hw.device == "cuda" else 0
    if hw.device == "cuda" and dev <= 0:
        raise PlanError("device memory budget unknown: pass device_memory_bytes")
    return _Budget(spec, hw, job, host, dev, int(ov.get("block_size", DEFAULT_BLOCK_SIZE)))


def _check_one_sequence_fits(b: _Budget, ov: dict, min_chunk: int) -> None:
    """The least any plan needs: one sequence, one prompt per pass, the fewest buffers."""
    host_act = b.host_act(1, 1, 1, min_chunk)
    if b.host_free_for_kv(host_act) < b.kv_one_seq:
        raise _host_error(b, 1, host_act)
    if b.cuda:
        nb = int(ov.get("num_buffers", MIN_NUM_BUFFERS))
        act = b.pass_act(1, 1, min_chunk)
        if b.model_group + nb * b.buffer + act > b.device_usable:
            raise _device_error(b, nb, act, b.model_group, f" for one prompt of {b.job.prompt_len} tokens")


def _batch_sizes(b: _Budget, ov: dict, min_chunk: int) -> list[int]:
    """G to try, largest first: the override, else the host KV limit, the G that splits the
    sequences into equal waves, and the powers of two below."""
    N = b.job.num_sequences
    g_cap = b.host_free_for_kv(b.host_act(1, 1, 1, min_chunk)) // b.kv_per_seq
    if "kv_cache_bytes" in ov:
        kv_override = int(ov["kv_cache_bytes"])
        if kv_override < b.kv_one_seq:
            raise PlanError(f"host memory: kv_cache_bytes={format_bytes(kv_override)} holds no sequence of "
                            f"{b.job.seq_tokens} tokens ({format_bytes(b.kv_one_seq)} each)")
        g_cap = min(g_cap, kv_override // b.kv_per_seq)
    if "max_batch" in ov:
        G = int(ov["max_batch"])
        if min(G, N) > g_cap:
            raise _host_error(b, min(G, N), b.host_act(1, 1, 1, min_chunk), f"max_batch={G}")
        return [G]
    top = max(1, min(g_cap, N))
    equal_waves = math.ceil(N / math.ceil(N / top))
    return sorted({top, equal_waves, *_pow2_below(top)}, reverse=True)


def _prompts_per_pass(b: _Budget, ov: dict, g_eff: int) -> list[int]:
    P = b.job.prefill_len         # the prefill budget counts the tokens computed
    if "max_prefill_tokens" in ov:
        return [max(1, min(g_eff, int(ov["max_prefill_tokens"]) // P))]
    engine_default = max(1, min(g_eff, DEFAULT_MAX_PREFILL_TOKENS // P))
    return sorted({g_eff, math.ceil(g_eff / 4), math.ceil(g_eff / 16), engine_default}, reverse=True)


def _candidates(b: _Budget, ov: dict, min_chunk: int) -> Iterator[_Candidate]:
    """Every combination of the choices searched (or fixed by ov), largest G first."""
    N, P = b.job.num_sequences, b.job.prefill_len
    if "num_buffers" in ov:
        buffers = [int(ov["num_buffers"])]
    elif b.tiled:   # the engine's own choice for experts the fused kernel runs in groups
        buffers = [disk_num_buffers(b.spec.num_experts, b.expert_buffer, b.host_bytes)]
    else:   # on the CPU nothing streams (but with the disk tier): the count does not matter
        buffers = list(BUFFER_OPTIONS) if b.cuda or b.disk else [MIN_NUM_BUFFERS]
    for G in _batch_sizes(b, ov, min_chunk):
        g_eff = max(1, min(G, N))
        # the CPU attention kernel wants many sequences, and nothing is staged on the device
        A = (int(ov["attn_micro_batch"]) or g_eff) if "attn_micro_batch" in ov else g_eff
        for per_pass, nb in itertools.product(_prompts_per_pass(b, ov, g_eff), buffers):
            chunk = int(ov["expert_chunk"]) if "expert_chunk" in ov else b.expert_chunk(max(g_eff, per_pass * P))
            yield _Candidate(G, A, per_pass, chunk, nb)


def _fits(b: _Budget, ov: dict, c: _Candidate) -> Plan | _Miss:
    """The Plan candidate c makes when both memories hold it, else by how much it misses."""
    g_eff = max(1, min(c.max_batch, b.job.num_sequences))
    host_act = b.host_act(g_eff, c.attn_micro_batch, c.prompts_per_pass, c.expert_chunk)
    kv_bytes = int(ov.get("kv_cache_bytes", g_eff * b.kv_per_seq))
    short = max(g_eff * b.kv_per_seq, kv_bytes) - b.host_free_for_kv(host_act)
    if short > 0:
        where = f"G={g_eff}, {c.prompts_per_pass} prompts per prefill pass"
        return _Miss(short, _host_error(b, g_eff, host_act, where))
    common = dict(device=b.hw.device, max_batch=c.max_batch, attn_micro_batch=c.attn_micro_batch,
                  expert_chunk=c.expert_chunk, num_buffers=c.num_buffers, kv_cache_bytes=kv_bytes,
                  block_size=b.block_size,
                  max_prefill_tokens=int(ov.get("max_prefill_tokens", c.prompts_per_pass * b.job.prefill_len)),
                  activation_bytes=b.pass_act(g_eff, c.prompts_per_pass, c.expert_chunk))
    if not b.cuda:
        return _host_fit(b, ov, c, common, host_act, kv_bytes)
    fit = _device_fit(b, ov, c, g_eff, common)
    return _host_tier(b, ov, fit, host_act, kv_bytes) if isinstance(fit, Plan) and b.disk else fit


def _host_tier(b: _Budget, ov: dict, plan: Plan, act: int, kv: int) -> Plan | _Miss:
    """On a GPU with a measured disk: the weights host memory holds beside the KV cache, the
    activations and the readers' staging (the engine's own choice, dense groups first); the
    streamed weights it does not hold are read from the files (disk -> host -> GPU)."""
    room = b.host_bytes - HOST_RESERVE_BYTES - act - kv - b.staging
    if "host_resident_bytes" not in ov and room >= b.weights:
        return plan
    want = int(ov.get("host_resident_bytes", room))
    if want > room or want < b.model_group:
        return _Miss(max(want, b.model_group) - room, _host_error(b, plan.max_batch, act,
                                                                  "weights streamed from disk, the readers' staging"))
    return replace(plan, host_resident_bytes=resident_set(b.spec, want, b.job.dtype_bytes).used_bytes)


def _host_fit(b: _Budget, ov: dict, c: _Candidate, common: dict, act: int, kv: int) -> Plan | _Miss:
    """On the CPU: every weight in host memory if they fit beside the KV cache and activations;
    else, with a measured disk, the disk tier: the buffer pool and what fits of the rest resident
    (the engine's own choice, dense groups first), the rest read from disk each pass."""
    room = b.host_bytes - HOST_RESERVE_BYTES - act - kv
    if "resident_bytes" not in ov and room >= b.weights:
        return Plan(**common)
    pool = b.disk_pool(c.num_buffers, dense_resident=True)[0]
    if room - pool < b.model_group + b.dense_bytes:      # a dense group streams too: buffers of its size
        pool = b.disk_pool(c.num_buffers, dense_resident=False)[0]
    want = int(ov.get("resident_bytes", room - pool))
    if not b.disk or want > room - pool or want < b.model_group:
        short = max(want, b.model_group) + pool - room if b.disk else b.weights - room
        return _Miss(short, _host_error(b, common["max_batch"], act,
                                        "weights streamed from disk, the buffer pool" if b.disk else None))
    resident = resident_set(b.spec, want, b.job.dtype_bytes)
    return Plan(**common, resident_bytes=resident.used_bytes,
                resident_fraction=resident.fraction(b.spec, b.job.dtype_bytes), pool_bytes=pool)


def _device_fit(b: _Budget, ov: dict, c: _Candidate, g_eff: int, common: dict) -> Plan | _Miss:
    """The plan with the weights the engine will keep resident in what the device has left
    beside the buffer pool and the activations."""
    act, pool = common["activation_bytes"], c.num_buffers * b.buffer
    room = b.device_usable - pool - act
    if "resident_bytes" in ov:
        want = int(ov["resident_bytes"])
        if want > room:
            return _Miss(want - room, PlanError(
                f"device memory: resident_bytes={format_bytes(want)} + {c.num_buffers} buffers "
                f"({format_bytes(pool)}) + activations ({format_bytes(act)}) need {format_bytes(want + pool + act)}, "
                f"{format_bytes(b.device_usable)} available; short by {format_bytes(want - room)}"))
        room = want
    if room < b.model_group:
        where = f" (G={g_eff}, A={c.attn_micro_batch}, {c.prompts_per_pass} prompts per pass)"
        return _Miss(b.model_group - room, _device_error(b, c.num_buffers, act, b.model_group, where))
    resident = resident_set(b.spec, room, b.job.dtype_bytes)      # the engine's own choice within this budget
    return Plan(**common, resident_bytes=resident.used_bytes,
                resident_fraction=resident.fraction(b.spec, b.job.dtype_bytes), pool_bytes=pool)


def _placements(b: _Budget, ov: dict, plan: Plan) -> list[Plan]:
    """The plan with decode attention on the CPU over the host KV cache and, on a GPU whose budget
    holds the job's KV cache beside the resident weights, the buffers and the activations, with
    the KV cache and decode attention on the device (no per-layer PCIe traffic, device bandwidth)."""
    wanted = ov.get("attention")
    kv = b.job.num_sequences * b.kv_per_seq
    fits = b.cuda and plan.resident_bytes + plan.pool_bytes + plan.activation_bytes + kv <= b.device_usable
    return [replace(plan, attention=a) for a in ("cpu", "device") if wanted in (None, a) and (a == "cpu" or fits)]


def _best(scored: list[tuple[Plan, Prediction]]) -> tuple[Plan, Prediction]:
    """Among plans within NEAR_TIE of the fastest, the one using the least memory: a gain smaller
    than the model's own error is not worth a bigger footprint (huge prefill passes, say)."""
    top = max(pred.e2e_tokens_per_s for _, pred in scored)
    near = [(plan, pred) for plan, pred in scored if pred.e2e_tokens_per_s >= (1 - NEAR_TIE) * top]
    return min(near, key=lambda it: (it[0].activation_bytes + it[0].kv_cache_bytes, -it[1].e2e_tokens_per_s))


# ---- the engine's own settings ----------------------------------------------------------------

def plan_from_engine_config(spec: ModelSpec, hw: Hardware, engine_config, job: JobShape) -> Plan:
    """The Plan an EngineConfig (or a dict of its fields) amounts to, as the engine would run it:
    G capped by the sequences its KV cache holds, the engine's defaults for what the config
    leaves unset (policy), resident weights chosen within device_memory minus the buffer pool
    (default budget: the policy's share of the GPU's memory; default KV cache: its share of host
    memory)."""
    cfg = engine_config if isinstance(engine_config, Mapping) else asdict(engine_config)
    get = lambda name, default: default if cfg.get(name) is None else cfg[name]   # noqa: E731
    db = job.dtype_bytes
    device = str(get("device", "cpu")).partition(":")[0]
    block = int(get("block_size", DEFAULT_BLOCK_SIZE))
    kv_cache = int(get("kv_cache_bytes", default_kv_cache_bytes(hw.host_memory_bytes)))
    blocks_per_seq = math.ceil(job.seq_tokens / block)
    block_bytes = block * spec.kv_bytes_per_token(db)
    if kv_cache // block_bytes < blocks_per_seq:
        raise PlanError(f"host memory: the engine's KV cache ({format_bytes(kv_cache)}) holds no sequence of "
                        f"{job.seq_tokens} tokens ({format_bytes(blocks_per_seq * block_bytes)} each)")
    fits = (kv_cache // block_bytes) // math.ceil(job.kv_tokens / block)    # shared prefixes held once
    G = max(1, min(int(get("max_batch", DEFAULT_MAX_BATCH)), fits))
    A = int(get("attn_micro_batch", DEFAULT_ATTN_MICRO_BATCH)) or G
    nb = int(get("num_buffers", DEFAULT_NUM_BUFFERS))
    common = dict(device=device, max_batch=G, attn_micro_batch=A, expert_chunk=int(get("expert_chunk", 0)),
                  num_buffers=nb, kv_cache_bytes=kv_cache, block_size=block,
                  max_prefill_tokens=int(get("max_prefill_tokens", DEFAULT_MAX_PREFILL_TOKENS)))
    if device == "cpu":
        return Plan(**common)
    if get("streaming", "auto") == "resident":
        everything = spec.weight_bytes(db)["total"]
        return Plan(**common, resident_bytes=everything, resident_fraction=1.0)
    budget = int(get("device_memory", default_device_budget_bytes(hw.device_memory_bytes)))
    pool = nb * buffer_bytes(spec, db)
    resident = resident_set(spec, max(budget - pool, 0), db)
    return Plan(**common, resident_bytes=resident.used_bytes, resident_fraction=resident.fraction(spec, db),
                pool_bytes=pool)


def predict_for_engine(spec: ModelSpec, hw: Hardware, engine_config, job: JobShape) -> Prediction:
    """Predicted times for the engine's actual settings (for the benchmark's predicted vs measured)."""
    return predict(spec, hw, plan_from_engine_config(spec, hw, engine_config, job), job)
