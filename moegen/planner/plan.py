"""A plan: the engine settings the planner chose, what it assumed about memory, and the overrides
that fix a choice instead of searching it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from moegen.errors import InputError, MoegenError
from moegen.planner.policy import (DEFAULT_ATTN_MICRO_BATCH, DEFAULT_BLOCK_SIZE, DEFAULT_MAX_BATCH,
                                   DEFAULT_MAX_PREFILL_TOKENS, DEFAULT_NUM_BUFFERS, HOST_RESERVE_BYTES,
                                   MIN_NUM_BUFFERS)

ENGINE_ALIGN_SLACK_BYTES = 1 << 20    # the engine aligns each tensor to 64 bytes: keep its budget >= ours


class PlanError(MoegenError):
    """No plan fits the memory budgets, or a plan asks for something the hardware cannot do."""


@dataclass(frozen=True)
class Plan:
    """Engine settings plus what the planner assumed about memory.

    max_batch (G): sequences decoding together; attn_micro_batch (A): sequences per attention
    micro-batch; expert_chunk: rows per expert GEMM (0 = all); num_buffers: buffers for streamed
    weights; attention: where decode attention runs and the KV cache lives; resident_bytes: weights
    kept on the device (on the CPU: in host memory, the rest streaming from disk; None: everything
    is resident); pool_bytes: those buffers; kv_cache_bytes: host KV cache; activation_bytes: the
    planner's working-set estimate on the compute device. Defaults are the engine's."""
    device: str = "cpu"
    attention: str = "cpu"       # decode attention: "cpu" over the host KV cache, or "device" (KV cache there)
    max_batch: int = DEFAULT_MAX_BATCH
    attn_micro_batch: int = DEFAULT_ATTN_MICRO_BATCH
    expert_chunk: int = 0
    num_buffers: int = DEFAULT_NUM_BUFFERS
    resident_bytes: int | None = None
    resident_fraction: float = 1.0
    pool_bytes: int = 0
    kv_cache_bytes: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS
    activation_bytes: int = 0
    # on a GPU with the disk tier: the weights host memory holds (the others are read from the files)
    host_resident_bytes: int | None = None

    @property
    def disk_tier(self) -> bool:
        """On the CPU, weights beyond resident_bytes stream from the checkpoint's files."""
        return self.device == "cpu" and self.resident_bytes is not None

    @property
    def host_memory_bytes(self) -> int | None:
        """The engine's host_memory for a disk-tier plan: what its layout (moegen.engine.disk_tier)
        then divides as the plan did; None when every weight is in memory (no budget needed)."""
        if not self.disk_tier:
            return None
        return (HOST_RESERVE_BYTES + self.activation_bytes + self.kv_cache_bytes + self.pool_bytes
                + self.resident_bytes + ENGINE_ALIGN_SLACK_BYTES)

    @property
    def device_memory_bytes(self) -> int | None:
        """The engine's device_memory: its resident weights and its buffer pool."""
        if self.device == "cpu" or self.resident_bytes is None:
            return None
        return self.resident_bytes + self.pool_bytes + ENGINE_ALIGN_SLACK_BYTES

    def to_engine_options(self) -> dict:
        """EngineConfig keyword arguments."""
        opts = dict(device=self.device, max_batch=self.max_batch, attn_micro_batch=self.attn_micro_batch,
                    max_prefill_tokens=self.max_prefill_tokens, expert_chunk=self.expert_chunk,
                    num_buffers=self.num_buffers, kv_cache_bytes=self.kv_cache_bytes, block_size=self.block_size)
        if self.device_memory_bytes is not None:
            opts["device_memory"] = self.device_memory_bytes
        if self.host_memory_bytes is not None:
            opts["host_memory_bytes"] = self.host_memory_bytes
        return opts

    def to_dict(self) -> dict:
        return {**asdict(self), "device_memory_bytes": self.device_memory_bytes,
                "host_memory_bytes": self.host_memory_bytes}


ATTENTION = ("cpu", "device")
ALIASES = {"G": "max_batch", "A": "attn_micro_batch", "g": "max_batch", "a": "attn_micro_batch"}
# What the planner derives, never takes as a choice.
DERIVED = ("resident_fraction", "pool_bytes", "activation_bytes")
CHOICES = tuple(f.name for f in fields(Plan) if f.name not in DERIVED)


def plan_overrides(overrides: Mapping[str, Any] | None) -> dict:
    """Plan fields to fix (also "G", "A"; None values ignored), checked."""
    out = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        name = ALIASES.get(key, key)
        if name not in CHOICES:
            raise InputError(f"plan override {key!r} is not a plan choice; choices: G, A, " + ", ".join(CHOICES))
        out[name] = value
    for name in ("max_batch", "block_size", "max_prefill_tokens"):
        if name in out and int(out[name]) < 1:
            raise InputError(f"plan override {name} must be >= 1, got {out[name]}")
    for name in ("attn_micro_batch", "expert_chunk", "kv_cache_bytes", "resident_bytes"):
        if name in out and int(out[name]) < 0:
            raise InputError(f"plan override {name} must be >= 0, got {out[name]}")
    if out.get("attention", "cpu") not in ATTENTION:
        raise InputError(f"plan override attention must be one of {', '.join(ATTENTION)}, got {out['attention']!r}")
    if "num_buffers" in out and int(out["num_buffers"]) < MIN_NUM_BUFFERS:
        raise InputError(f"plan override num_buffers must be >= {MIN_NUM_BUFFERS}, got {out['num_buffers']}")
    return out
