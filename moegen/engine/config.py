"""The engine's settings: one EngineConfig, validated where it is made."""
from dataclasses import dataclass

from moegen.engine.memory import parse_bytes
from moegen.errors import InputError


@dataclass
class EngineConfig:
    device: str = "cpu"
    kv_cache_bytes: int | None = None     # host memory for the KV cache; default 25% of RAM
    device_memory: int | None = None      # device budget for resident weights + buffers (cuda)
    block_size: int = 16
    # None = chosen per generate() call by the planner (moegen.planner) from this machine's probe
    max_batch: int | None = None          # global batch G (sequences decoding together)
    attn_micro_batch: int | None = None   # A: sequences per attention micro-batch (0 = all)
    max_prefill_tokens: int | None = None  # prompt tokens per prefill step
    expert_chunk: int = 0                 # rows per expert GEMM (0 = all of an expert's tokens)
    streaming: str = "auto"               # auto | resident | staged
    num_buffers: int = 4                  # streamed-weight buffers on the device
    # pack GEMM weights into oneDNN's layout once at load (CPU, bf16/fp16, resident weights);
    # None = whenever supported. Same results, faster GEMMs; costs one pass over the weights.
    prepack: bool | None = None
    max_model_len: int | None = None

    def __post_init__(self):
        for name in ("block_size", "max_batch", "max_prefill_tokens", "num_buffers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.streaming not in ("auto", "resident", "staged"):
            raise InputError(f"streaming must be auto, resident or staged, got {self.streaming!r}")
        if self.num_buffers < 2 and self.streaming != "resident":
            raise InputError("num_buffers must be >= 2: a layer's dense weights and one expert are held at once")


def engine_config(device, host_memory, device_memory, overrides: dict) -> EngineConfig:
    """The constructors' user-facing sizes ("8GB") -> an EngineConfig."""
    return EngineConfig(device=str(device), kv_cache_bytes=parse_bytes(host_memory),
                        device_memory=parse_bytes(device_memory), **overrides)

