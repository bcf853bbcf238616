"""The engine's memory and batching policy, declared once: its defaults, the memory it takes
when not told, which weights stay on the device, and the settings a call runs with.

The engine runs by these rules and the planner models them, so both import this module. It is
plain Python and imports nothing from moegen: the engine may import the planner, never the
reverse.
"""
from dataclasses import dataclass
from typing import Any, Mapping

DEFAULT_BLOCK_SIZE = 16              # tokens per KV cache block
DEFAULT_MAX_BATCH = 256              # G: sequences decoding together
DEFAULT_ATTN_MICRO_BATCH = 32        # A: sequences per attention micro-batch
DEFAULT_MAX_PREFILL_TOKENS = 8192    # prompt tokens per prefill pass
DEFAULT_NUM_BUFFERS = 4              # device buffers for streamed weights
MIN_NUM_BUFFERS = 2                  # a streamed layer holds its dense group and one expert at once
DEVICE_MEMORY_FRACTION = 0.8         # of the GPU's free memory, when no device budget is given
HOST_KV_FRACTION = 0.25              # of host memory for the KV cache, when no budget at all is given
HOST_KV_SHARE = 0.25                 # of a host_memory budget the KV cache needs at least, or weights go to disk
DISK_KV_SHARE = 0.5                  # with the disk tier, of the memory left beside the pool: the rest holds weights
HOST_RESERVE_BYTES = 512 << 20       # host memory for Python, torch, tokenizer, allocator (counted in host_memory)
DEVICE_RESERVE_BYTES = 512 << 20     # device memory for the CUDA context, cuBLAS workspaces
DEVICE_RESERVE_FRACTION = 0.03       # of the device budget: allocator fragmentation

# Chosen per call (by the planner) unless the engine's config fixes them.
PLANNED = ("max_batch", "attn_micro_batch", "max_prefill_tokens")
FALLBACK_SETTINGS = {"max_batch": DEFAULT_MAX_BATCH, "attn_micro_batch": DEFAULT_ATTN_MICRO_BATCH,
                     "max_prefill_tokens": DEFAULT_MAX_PREFILL_TOKENS}


def default_kv_cache_bytes(host_memory_bytes: int) -> int:
    return int(host_memory_bytes * HOST_KV_FRACTION)


def default_device_budget_bytes(device_memory_bytes: float) -> int:
    return int(device_memory_bytes * DEVICE_MEMORY_FRACTION)


def device_reserve_bytes(budget_bytes: int) -> int:
    """What a device budget keeps back from weights and activations (context, fragmentation)."""
    return min(budget_bytes, DEVICE_RESERVE_BYTES + int(DEVICE_RESERVE_FRACTION * budget_bytes))


DISK_READERS = 2                     # the disk tier's reader threads: one reading while another packs
DISK_POOL_SHARE = 0.1                # of host_memory the disk tier's expert buffers take at most, by default


def disk_num_buffers(experts_per_layer: int, expert_bytes: int, host_memory_bytes: int) -> int:
    """The disk tier's buffers when not given, for experts the fused kernel runs in groups of half
    the pool: a layer's experts (reads then go on while the next layer's attention runs; a pool of
    32 on a 128-expert model measured 10-30% slower than 128), within DISK_POOL_SHARE of host
    memory, at least MIN_NUM_BUFFERS."""
    fits = int(DISK_POOL_SHARE * host_memory_bytes) // max(expert_bytes, 1)
    return max(MIN_NUM_BUFFERS, min(experts_per_layer, fits))


def disk_pool_bytes(num_buffers: int, buffer_bytes: int, packed: bool, scratch: int = 1) -> int:
    """Host memory of the disk tier's pool (moegen.engine.disk_tier): num_buffers buffers of the
    largest streamed module, `scratch` modules' worth for the readers' own temporaries, and with
    packed (bf16/fp16 GEMM weights re-laid out for oneDNN after each read) the packed copies beside
    them."""
    return (num_buffers * (2 if packed else 1) + scratch) * buffer_bytes


def disk_pool(num_buffers: int, expert_bytes: int, largest_bytes: int, packed: bool, tiled: bool,
              dense_resident: bool, to_device: bool = False) -> tuple[int, int]:
    """(host pool bytes, buffer bytes) of the disk tier: buffers of one expert where every dense
    group stays resident (only experts stream), else of the largest module. Experts the fused kernel
    runs (`tiled`) are packed into their buffers as read, so they have no packed copies, and each
    reader keeps an expert's worth of scratch to read into. to_device (disk -> host -> GPU): the
    buffers are the device's; the host holds only each reader's staging buffer."""
    scratch = DISK_READERS if tiled or to_device else 1
    buffers = 0 if to_device else num_buffers
    if dense_resident and expert_bytes:
        return disk_pool_bytes(buffers, expert_bytes, packed and not tiled, scratch), expert_bytes
    return disk_pool_bytes(buffers, largest_bytes, packed, scratch), largest_bytes


def choose_resident(groups: Mapping[str, Any], sizes: Mapping[str, int], budget_bytes: int) -> set:
    """Keep weight groups on the device while they fit: the top-level and per-layer dense groups
    first (every step needs them), then experts in layer order. A group that does not fit is
    skipped and the next one tried. Keys name groups as the engine does ("....experts.N" for an
    expert); groups gives the order, sizes the bytes."""
    order = [k for k in groups if ".experts." not in k] + [k for k in groups if ".experts." in k]
    resident, used = set(), 0
    for key in order:
        if used + sizes[key] <= budget_bytes:
            resident.add(key)
            used += sizes[key]
    return resident


@dataclass(frozen=True)
class CallPlan:
    """What one generate() or loglikelihood() call ran with: `settings` (the PLANNED keys), and the
    planner's plan and prediction when the planner chose any of them (None when the config fixed
    them all, or the planner was unavailable)."""
    settings: Mapping[str, int]
    plan: Any = None
    prediction: Any = None


def call_plan(fixed: Mapping[str, int], plan=None, prediction=None) -> CallPlan:
    """The config's fixed settings win; the plan's fill the rest, else the fallback's."""
    chosen = {k: getattr(plan, k) for k in PLANNED} if plan is not None else FALLBACK_SETTINGS
    return CallPlan({**chosen, **fixed}, plan, prediction)
