"""Plan search: the engine settings that maximise predicted end-to-end tokens/s within memory.

Memory accounting (what must fit):
- host: every weight (memory-mapped on the CPU, pinned copies with CUDA) + the KV cache of G
  sequences of prompt_len + gen_len tokens (rounded up to whole blocks, as the engine admits a
  sequence only with blocks for its whole lifetime) + activations when the CPU computes + a reserve
  for the Python/torch runtime;
- device (cuda): the resident weights (embedding/lm_head always) + num_buffers streaming buffers of
  the largest module + activations of the largest pass (+ the KV staging of an attention
  micro-batch when attention runs on the GPU) + a reserve for the CUDA context and fragmentation.
The engine fills whatever device budget is left with resident weights, dense groups first, so the
plan's resident bytes are "the rest" and `to_engine_options()` hands the engine exactly the budget
that makes it choose the same set.

Search space: G (powers of two up to the host limit, the limit itself, and the G that splits the
sequences into equal waves), prompts per prefill pass, streaming buffers, attention placement
(only what the engine implements unless asked), attention micro-batch and expert chunk (the
largest whose working set fits). Any field of `Plan` can be fixed through `overrides`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from moegen.errors import InputError
from moegen.planner.cost_model import (ATTENTION_PLACEMENTS, Hardware, PlanError, Prediction, Workload,
                                       _attention_link_bytes, activation_bytes, buffer_bytes, format_bytes,
                                       model_group_bytes, predict, resident_set)
from moegen.planner.model_spec import ModelSpec

__all__ = ["Plan", "PlanError", "search", "predict_for_engine", "plan_from_engine_config", "ENGINE_ATTENTION"]

# Decode attention placements the engine runs today: on a GPU engine it attends on the CPU over
# the host KV cache (q/k/v cross PCIe). "gpu" and "split" are modelled for what-if plans only.
ENGINE_ATTENTION = {"cpu": ("cpu",), "cuda": ("cpu",)}
HOST_RESERVE_BYTES = 256 << 20        # Python, torch, tokenizer, allocator
DEVICE_RESERVE_BYTES = 512 << 20      # CUDA context, cuBLAS workspaces
DEVICE_RESERVE_FRACTION = 0.03        # allocator fragmentation
EXPERT_WORKSET_FRACTION = 1 / 8       # an expert GEMM chain's rows may use this share of the budget
ENGINE_ALIGN_SLACK_BYTES = 1 << 20    # the engine aligns each tensor to 64 bytes: keep its budget >= ours
MIN_EXPERT_CHUNK = 64
NEAR_TIE = 0.01                       # predicted rates this close count as equal
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Plan:
    """Engine settings plus what the planner assumed about memory.

    max_batch (G): sequences decoding together; attn_micro_batch (A): sequences per attention
    micro-batch; expert_chunk: rows per expert GEMM (0 = all); attention: decode attention
    placement; num_buffers: device buffers for streamed weights; resident_bytes: weights kept on
    the device (None on the CPU: everything is resident); pool_bytes: those buffers;
    kv_cache_bytes: host KV cache; activation_bytes: the planner's working-set estimate on the
    compute device."""
    device: str = "cpu"
    max_batch: int = 256
    attn_micro_batch: int = 32
    expert_chunk: int = 0
    attention: str = "cpu"
    num_buffers: int = 2
    resident_bytes: int | None = None
    resident_fraction: float = 1.0
    pool_bytes: int = 0
    kv_cache_bytes: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    max_prefill_tokens: int = 8192
    activation_bytes: int = 0

    @property
    def device_memory_bytes(self) -> int | None:
        """The engine's device_memory: its resident weights and its buffer pool."""
        if self.device == "cpu" or self.resident_bytes is None:
            return None
        return self.resident_bytes + self.pool_bytes + ENGINE_ALIGN_SLACK_BYTES

    def to_engine_options(self) -> dict:
        """EngineConfig keyword arguments (attention placement has no engine knob: see
        ENGINE_ATTENTION)."""
        opts = dict(device=self.device, max_batch=self.max_batch, attn_micro_batch=self.attn_micro_batch,
                    max_prefill_tokens=self.max_prefill_tokens, expert_chunk=self.expert_chunk,
                    num_buffers=self.num_buffers, kv_cache_bytes=self.kv_cache_bytes, block_size=self.block_size)
        if self.device_memory_bytes is not None:
            opts["device_memory"] = self.device_memory_bytes
        return opts

    def to_dict(self) -> dict:
        return {**asdict(self), "device_memory_bytes": self.device_memory_bytes}


PLAN_FIELDS = tuple(f.name for f in fields(Plan))
ALIASES = {"G": "max_batch", "A": "attn_micro_batch", "g": "max_batch", "a": "attn_micro_batch"}


def _overrides(overrides: Mapping[str, Any] | None) -> dict:
    out = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        name = ALIASES.get(key, key)
        if name not in PLAN_FIELDS or name in ("resident_fraction", "pool_bytes", "activation_bytes"):
            raise InputError(f"plan override {key!r} is not a plan choice; choices: G, A, "
                             + ", ".join(n for n in PLAN_FIELDS if n not in ("resident_fraction", "pool_bytes",
                                                                              "activation_bytes")))
        out[name] = value
    if "attention" in out and out["attention"] not in ATTENTION_PLACEMENTS:
        raise InputError(f"attention must be one of {', '.join(ATTENTION_PLACEMENTS)}, not {out['attention']!r}")
    for name in ("max_batch", "block_size", "max_prefill_tokens"):
        if name in out and int(out[name]) < 1:
            raise InputError(f"plan override {name} must be >= 1, got {out[name]}")
    for name in ("attn_micro_batch", "expert_chunk", "kv_cache_bytes", "resident_bytes"):
        if name in out and int(out[name]) < 0:
            raise InputError(f"plan override {name} must be >= 0, got {out[name]}")
    if "num_buffers" in out and int(out["num_buffers"]) < 2:
        raise InputError(f"plan override num_buffers must be >= 2, got {out['num_buffers']}")
    return out


def _pow2_below(n: int) -> list[int]:
    out, p = [], 1
    while p < n:
        out.append(p)
        p *= 2
    return out


@dataclass
class _Budget:
    """The fixed parts of both memories for one (spec, hardware, workload)."""
    spec: ModelSpec
    hw: Hardware
    wl: Workload
    host_bytes: int
    device_bytes: int
    block_size: int

    def __post_init__(self):
        db = self.wl.dtype_bytes
        self.weights = self.spec.weight_bytes(db)["total"]
        blocks = math.ceil(self.wl.seq_tokens / self.block_size)
        self.kv_per_seq = blocks * self.block_size * self.spec.kv_bytes_per_token(db)
        self.cuda = self.hw.device == "cuda"
        self.buffer = buffer_bytes(self.spec, db) if self.cuda else 0
        self.model_group = model_group_bytes(self.spec, db)
        reserve = DEVICE_RESERVE_BYTES + int(DEVICE_RESERVE_FRACTION * self.device_bytes)
        self.device_reserve = min(reserve, self.device_bytes)
        self.device_usable = self.device_bytes - self.device_reserve

    # working sets
    def compute_act(self, tokens: int, out_rows: int, expert_rows: int, prefill: bool) -> int:
        return activation_bytes(self.spec, tokens, out_rows, expert_rows, self.wl.dtype_bytes, prefill)

    def pass_act(self, G: int, per_pass: int, chunk: int) -> int:
        """Largest working set of a prefill pass or a decode step."""
        P = self.wl.prompt_len
        pre_tokens = per_pass * P
        pre = self.compute_act(pre_tokens, per_pass, min(chunk or pre_tokens, pre_tokens), True)
        dec = self.compute_act(G, G, min(chunk or G, G), False)
        return max(pre, dec)

    def host_act(self, G: int, A: int, per_pass: int, chunk: int) -> int:
        if not self.cuda:
            return self.pass_act(G, per_pass, chunk)
        out_b, back_b = _attention_link_bytes(self.spec, self.wl.dtype_bytes)
        return int(A * (out_b + back_b) * 2)        # a micro-batch's q/k/v and output, staged

    def staging(self, A: int, attention: str) -> int:
        """KV of one attention micro-batch on the GPU (double-buffered), one layer at a time."""
        if not self.cuda or attention == "cpu":
            return 0
        per_layer = self.spec.kv_bytes_per_token(self.wl.dtype_bytes) / self.spec.num_layers
        return int(2 * A * self.wl.seq_tokens * per_layer)

    def host_free_for_kv(self, act: int) -> int:
        return self.host_bytes - self.weights - HOST_RESERVE_BYTES - act

    def expert_chunk(self, tokens: int) -> int:
        """0 (all rows) if an expert GEMM chain over every token of the pass fits its share of
        memory, else the largest power of two that does (an expert may get every token)."""
        room = EXPERT_WORKSET_FRACTION * (self.device_usable if self.cuda else self.host_bytes - self.weights)
        per_row = self.compute_act(0, 0, 1, False)
        if tokens * per_row <= room:
            return 0
        chunk = MIN_EXPERT_CHUNK
        while chunk * 2 * per_row <= room and chunk * 2 < tokens:
            chunk *= 2
        return chunk


def _host_error(b: _Budget, G: int, act: int, what: str | None = None) -> PlanError:
    free = b.host_free_for_kv(act)
    need = G * b.kv_per_seq
    seqs = "one sequence" if G == 1 else f"{G} sequences"
    detail = (f"budget {format_bytes(b.host_bytes)} - weights {format_bytes(b.weights)} - activations "
              f"{format_bytes(act)} - reserve {format_bytes(HOST_RESERVE_BYTES)}")
    if free < 0:
        return PlanError(f"host memory: the weights ({format_bytes(b.weights)}), activations ({format_bytes(act)}) and "
                         f"reserve ({format_bytes(HOST_RESERVE_BYTES)}) need {format_bytes(b.host_bytes - free)}, "
                         f"the budget is {format_bytes(b.host_bytes)}; short by {format_bytes(-free + need)} "
                         f"with the KV cache of {seqs}")
    return PlanError(f"host memory: the KV cache for {seqs} of {b.wl.seq_tokens} tokens needs {format_bytes(need)}, "
                     f"{format_bytes(free)} available ({detail}); short by {format_bytes(need - free)}"
                     + (f" ({what})" if what else ""))


def _device_error(b: _Budget, nb: int, act: int, resident_min: int, what: str = "") -> PlanError:
    need = resident_min + nb * b.buffer + act
    return PlanError(f"device memory: the always-resident embedding/lm_head ({format_bytes(resident_min)}) + "
                     f"{nb} streaming buffers of the largest module ({nb} x {format_bytes(b.buffer)}) + "
                     f"activations{what} ({format_bytes(act)}) need {format_bytes(need)}, "
                     f"{format_bytes(b.device_usable)} available (budget {format_bytes(b.device_bytes)} - reserve "
                     f"{format_bytes(b.device_reserve)}); short by {format_bytes(need - b.device_usable)}")


def search(spec: ModelSpec, hw: Hardware, workload: Workload, host_memory_bytes: int | None = None,
           device_memory_bytes: int | None = None, overrides: Mapping[str, Any] | None = None,
           attention_options: tuple[str, ...] | None = None) -> tuple[Plan, Prediction]:
    """The plan with the highest predicted end-to-end tokens/s that fits both memories.

    host_memory_bytes: what moegen may use of host memory (weights, KV cache, activations);
    default hw.host_memory_bytes. device_memory_bytes: the GPU's budget; default
    hw.device_memory_bytes. overrides: Plan fields to fix (also "G", "A"). attention_options:
    decode attention placements to consider on a GPU (default: what the engine implements).
    Raises PlanError naming the memory that is short, and by how much."""
    ov = _overrides(overrides)
    device = str(ov.get("device", hw.device)).partition(":")[0]
    if device != hw.device:
        raise PlanError(f"device {device!r} asked for, but the hardware constants describe {hw.device!r}")
    host = int(host_memory_bytes or hw.host_memory_bytes or 0)
    if host <= 0:
        raise PlanError("host memory budget unknown: pass host_memory_bytes (or probe this machine)")
    dev = int(device_memory_bytes or hw.device_memory_bytes or 0) if hw.device == "cuda" else 0
    if hw.device == "cuda" and dev <= 0:
        raise PlanError("device memory budget unknown: pass device_memory_bytes")
    b = _Budget(spec, hw, workload, host, dev, int(ov.get("block_size", DEFAULT_BLOCK_SIZE)))
    wl, P, N = workload, workload.prompt_len, workload.num_sequences

    # the least any plan needs: one sequence, one prompt per pass, two buffers
    min_chunk = int(ov["expert_chunk"]) if "expert_chunk" in ov else b.expert_chunk(P)
    act_one = b.pass_act(1, 1, min_chunk)
    if b.host_free_for_kv(b.host_act(1, 1, 1, min_chunk)) < b.kv_per_seq:
        raise _host_error(b, 1, b.host_act(1, 1, 1, min_chunk))
    if b.cuda:
        nb_min = int(ov.get("num_buffers", 2))
        if b.model_group + nb_min * b.buffer + act_one > b.device_usable:
            raise _device_error(b, nb_min, act_one, b.model_group, f" for one prompt of {P} tokens")

    # G: the host KV limit, equal waves, powers of two
    g_cap = b.host_free_for_kv(b.host_act(1, 1, 1, min_chunk)) // b.kv_per_seq
    if "kv_cache_bytes" in ov:
        kv_override = int(ov["kv_cache_bytes"])
        if kv_override < b.kv_per_seq:
            raise PlanError(f"host memory: kv_cache_bytes={format_bytes(kv_override)} holds no sequence of "
                            f"{wl.seq_tokens} tokens ({format_bytes(b.kv_per_seq)} each)")
        g_cap = min(g_cap, kv_override // b.kv_per_seq)
    if "max_batch" in ov:
        g_list = [int(ov["max_batch"])]
        if min(g_list[0], N) > g_cap:
            raise _host_error(b, min(g_list[0], N), b.host_act(1, 1, 1, min_chunk), f"max_batch={g_list[0]}")
    else:
        top = max(1, min(g_cap, N))
        equal_waves = math.ceil(N / math.ceil(N / top))
        g_list = sorted({top, equal_waves, *_pow2_below(top)}, reverse=True)

    placements = ([ov["attention"]] if "attention" in ov else
                  list(attention_options or ENGINE_ATTENTION[hw.device]) if b.cuda else ["cpu"])
    buffers = [int(ov["num_buffers"])] if "num_buffers" in ov else ([2, 3, 4] if b.cuda else [2])

    scored: list[tuple[Plan, Prediction]] = []
    closest_miss: tuple[int, PlanError] | None = None
    for G in g_list:
        g_eff = max(1, min(G, N))
        if "max_prefill_tokens" in ov:
            passes = [max(1, min(g_eff, int(ov["max_prefill_tokens"]) // P))]
        else:
            passes = sorted({g_eff, math.ceil(g_eff / 4), math.ceil(g_eff / 16), max(1, min(g_eff, 8192 // P))},
                            reverse=True)
        for attention in placements:
            if "attn_micro_batch" in ov:
                micro = [int(ov["attn_micro_batch"]) or g_eff]
            elif attention == "cpu":
                micro = [g_eff]          # the CPU kernel wants many sequences; no device staging
            else:
                micro = sorted({g_eff, math.ceil(g_eff / 4), math.ceil(g_eff / 16)}, reverse=True)
            for per_pass in passes:
                tokens = max(g_eff, per_pass * P)
                chunk = int(ov["expert_chunk"]) if "expert_chunk" in ov else b.expert_chunk(tokens)
                for A in micro:
                    host_act = b.host_act(g_eff, A, per_pass, chunk)
                    kv_bytes = int(ov.get("kv_cache_bytes", g_eff * b.kv_per_seq))
                    short = g_eff * b.kv_per_seq - b.host_free_for_kv(host_act)
                    if "kv_cache_bytes" in ov:
                        short = max(short, kv_bytes - b.host_free_for_kv(host_act))
                    if short > 0:
                        miss = _host_error(b, g_eff, host_act, f"G={g_eff}, {per_pass} prompts per prefill pass")
                        if closest_miss is None or short < closest_miss[0]:
                            closest_miss = (short, miss)
                        continue
                    for nb in buffers:
                        plan = _make_plan(b, ov, device, G, A, chunk, attention, nb, per_pass, kv_bytes)
                        if isinstance(plan, tuple):      # (shortfall, PlanError)
                            if closest_miss is None or plan[0] < closest_miss[0]:
                                closest_miss = plan
                            continue
                        scored.append((plan, predict(spec, hw, plan, wl)))
    if not scored:
        raise closest_miss[1] if closest_miss else PlanError("no plan fits")   # pragma: no cover
    # Among plans within NEAR_TIE of the fastest, the one using the least memory: a gain smaller
    # than the model's own error is not worth a bigger footprint (huge prefill passes, say).
    top = max(pred.e2e_tokens_per_s for _, pred in scored)
    near = [(plan, pred) for plan, pred in scored if pred.e2e_tokens_per_s >= (1 - NEAR_TIE) * top]
    return min(near, key=lambda it: (it[0].activation_bytes + it[0].kv_cache_bytes, -it[1].e2e_tokens_per_s))


def _make_plan(b: _Budget, ov: dict, device: str, G: int, A: int, chunk: int, attention: str, nb: int,
               per_pass: int, kv_bytes: int):
    """A Plan, or (shortfall bytes, PlanError) when the device budget cannot hold it."""
    P, db = b.wl.prompt_len, b.wl.dtype_bytes
    g_eff = max(1, min(G, b.wl.num_sequences))
    act = b.pass_act(g_eff, per_pass, chunk)
    mpt = int(ov.get("max_prefill_tokens", per_pass * P))
    common = dict(device=device, max_batch=G, attn_micro_batch=A, expert_chunk=chunk, attention=attention,
                  kv_cache_bytes=kv_bytes, block_size=b.block_size, max_prefill_tokens=mpt)
    if not b.cuda:
        return Plan(**common, num_buffers=nb, resident_bytes=None, resident_fraction=1.0, activation_bytes=act)
    act += b.staging(A, attention)
    pool = nb * b.buffer
    room = b.device_usable - pool - act
    if "resident_bytes" in ov:
        want = int(ov["resident_bytes"])
        if want > room:
            err = PlanError(f"device memory: resident_bytes={format_bytes(want)} + {nb} buffers "
                            f"({format_bytes(pool)}) + activations ({format_bytes(act)}) need "
                            f"{format_bytes(want + pool + act)}, {format_bytes(b.device_usable)} available; "
                            f"short by {format_bytes(want - room)}")
            return want - room, err
        room = want
    if room < b.model_group:
        return b.model_group - room, _device_error(b, nb, act, b.model_group, f" (G={g_eff}, A={A}, "
                                                                               f"{per_pass} prompts per pass)")
    # what the engine will actually keep: its greedy choice within this budget
    resident = resident_set(b.spec, room, db)
    return Plan(**common, num_buffers=nb, resident_bytes=resident.used_bytes,
                resident_fraction=resident.fraction(b.spec, db), pool_bytes=pool, activation_bytes=act)


# ---- the engine's own settings ----------------------------------------------------------------

def plan_from_engine_config(spec: ModelSpec, hw: Hardware, engine_config, workload: Workload) -> Plan:
    """The Plan an EngineConfig (or a dict of its fields) amounts to, as the engine would run it:
    G capped by the sequences its KV cache holds, decode attention on the CPU, resident weights
    chosen within device_memory minus the buffer pool (default budget: 80% of the GPU, as the
    engine takes 80% of free memory; default KV cache: 25% of host memory)."""
    cfg = engine_config if isinstance(engine_config, Mapping) else asdict(engine_config)
    get = lambda name, default: default if cfg.get(name) is None else cfg[name]   # noqa: E731
    db = workload.dtype_bytes
    device = str(get("device", "cpu")).partition(":")[0]
    block = int(get("block_size", DEFAULT_BLOCK_SIZE))
    kv_cache = int(get("kv_cache_bytes", hw.host_memory_bytes // 4))
    blocks_per_seq = math.ceil(workload.seq_tokens / block)
    block_bytes = block * spec.kv_bytes_per_token(db)
    fits = (kv_cache // block_bytes) // blocks_per_seq
    if fits < 1:
        raise PlanError(f"host memory: the engine's KV cache ({format_bytes(kv_cache)}) holds no sequence of "
                        f"{workload.seq_tokens} tokens ({format_bytes(blocks_per_seq * block_bytes)} each)")
    G = max(1, min(int(get("max_batch", 256)), fits))
    A = int(get("attn_micro_batch", 32)) or G
    nb = int(get("num_buffers", 4))
    common = dict(device=device, max_batch=G, attn_micro_batch=A, expert_chunk=int(get("expert_chunk", 0)),
                  attention="cpu", num_buffers=nb, kv_cache_bytes=kv_cache, block_size=block,
                  max_prefill_tokens=int(get("max_prefill_tokens", 8192)))
    if device == "cpu":
        return Plan(**common)
    if get("streaming", "auto") == "resident":
        everything = spec.weight_bytes(db)["total"]
        return Plan(**common, resident_bytes=everything, resident_fraction=1.0)
    budget = int(get("device_memory", 0.8 * hw.device_memory_bytes))
    pool = nb * buffer_bytes(spec, db)
    resident = resident_set(spec, max(budget - pool, 0), db)
    return Plan(**common, resident_bytes=resident.used_bytes, resident_fraction=resident.fraction(spec, db),
                pool_bytes=pool)


def predict_for_engine(spec: ModelSpec, hw: Hardware, engine_config, workload: Workload) -> Prediction:
    """Predicted times for the engine's actual settings (for the benchmark's predicted vs measured)."""
    return predict(spec, hw, plan_from_engine_config(spec, hw, engine_config, workload), workload)

