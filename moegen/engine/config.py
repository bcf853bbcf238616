"""The engine's settings: one EngineConfig, validated where it is made.

Each field is declared once, with what users see of it (an `Option`: help, kind, public name);
moegen.engine.options generates the CLI flags, the flow parameters, the systems' options and the
lm-eval model_args from these declarations, so a new field reaches every consumer by itself.
"""
from dataclasses import dataclass, field, fields

from moegen.dtypes import DTYPES, dtype_name
from moegen.engine.memory import host_memory_bytes, parse_bytes
from moegen.errors import CapacityError, InputError
from moegen.planner.memory import format_bytes
from moegen.planner.policy import DEFAULT_BLOCK_SIZE, DEFAULT_NUM_BUFFERS


@dataclass(frozen=True)
class Option:
    """How one setting is offered to users. kind: "int" (at least `minimum`), "bytes" (an int or a
    size such as "8GB"), "choice" (one of `choices`), "bool" or "str". `name` is the public name
    (CLI flag --name-with-dashes, flow parameter, lm-eval model_arg) where it is not the field's;
    a `load_arg` is a parameter of its own in every consumer (as dtype is), not an engine option."""
    help: str
    kind: str = "int"
    default: object = None
    minimum: int | None = None
    choices: tuple = ()
    name: str = ""
    load_arg: bool = False

    def checked(self, name: str, value):
        """value as the config holds it (a size read from "8GB"); an InputError naming `name` if it
        is not of this kind. None is "unset", allowed only where the default is None."""
        if value is None:
            if self.default is not None:
                raise InputError(f"{name} must be set (default {self.default!r}), got None")
            return None
        if self.kind == "bytes":
            size = parse_bytes(value)
            if size < 1:      # 0 is no budget, not "the default": leave it unset for that
                raise InputError(f"{name} must be a positive size such as 8GB, got {value!r}")
            return size
        if self.kind == "str":
            return str(value)      # a torch.device is held as its name
        if self.kind == "int":
            return self._checked_int(name, value)
        if self.kind == "bool" and not isinstance(value, bool):
            raise InputError(f"{name} must be true or false, got {value!r}")
        if self.kind == "choice" and value not in self.choices:
            raise InputError(f"{name} must be {', '.join(self.choices[:-1])} or {self.choices[-1]}, got {value!r}")
        return value

    def _checked_int(self, name: str, value) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{name} must be an integer, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise InputError(f"{name} must be >= {self.minimum}, got {value}")
        return value

    def parsed(self, name: str, text: str):
        """A value given as text (lm-eval model_args, --opt, a form) -> this option's type."""
        if self.kind == "int":
            try:
                return int(text)
            except ValueError:
                raise InputError(f"{name} must be an integer, got {text!r}") from None
        if self.kind == "bool":
            words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            if text.strip().lower() not in words:
                raise InputError(f"{name} must be true or false, got {text!r}")
            return words[text.strip().lower()]
        return text                # sizes, choices and names are text already


def option(default, help: str, kind: str = "int", **declared):
    """A dataclass field whose default and user-facing declaration (Option) are written together."""
    return field(default=default, metadata={"option": Option(help, kind, default, **declared)})


# Engine.from_pretrained's dtype is the model's, not the engine's: declared here beside the fields,
# offered by every consumer as a parameter of its own (canonical names only, e.g. not "bf16").
DTYPE = Option("float32, bfloat16 or float16", "choice", "bfloat16", name="dtype", load_arg=True,
               choices=tuple(dict.fromkeys(dtype_name(d) for d in DTYPES.values())))


@dataclass
class EngineConfig:
    device: str = option("cpu", "cpu or cuda[:N]", "str", load_arg=True)
    host_memory_bytes: int | None = option(
        None, "all the host memory moegen may use: resident weights, streaming buffers, KV cache, activations, "
        "e.g. 16GB; weights that do not fit beside the rest stream from the checkpoint's files (default: no limit, "
        "every weight in memory)", "bytes", name="host_memory")
    kv_cache_bytes: int | None = option(None, "host memory for the KV cache, e.g. 8GB (default: within host_memory, "
                                        "what the weights leave, at least a quarter, or with weights streamed from "
                                        "disk half of what is left beside the buffers; without host_memory 25% of "
                                        "RAM)", "bytes", name="kv_cache_memory")
    device_memory: int | None = option(None, "device memory budget for resident weights and streaming buffers, "
                                       "e.g. 20GB (cuda; default 80% of free memory)", "bytes")
    block_size: int = option(DEFAULT_BLOCK_SIZE, "tokens per KV-cache block", minimum=1)
    # None = chosen per generate() call by the planner (moegen.planner) from this machine's probe
    max_batch: int | None = option(None, "global batch G: sequences decoded together (default: planned)",
                                   minimum=1)
    attn_micro_batch: int | None = option(None, "sequences per attention micro-batch A (0 = all; default: planned)",
                                          minimum=0)
    max_prefill_tokens: int | None = option(None, "prompt tokens per prefill step (default: planned)", minimum=1)
    expert_chunk: int = option(0, "max rows per expert GEMM, 0 = all of an expert's tokens", minimum=0)
    streaming: str = option("auto", "weights: auto (cuda: what fits stays on the device, the rest streams), "
                            "resident (all on the device) or staged (streamed, also on cpu)", "choice",
                            choices=("auto", "resident", "staged"))
    num_buffers: int | None = option(None, "buffers for streamed weights, >= 2 unless streaming is resident "
                                     f"(default: {DEFAULT_NUM_BUFFERS}; the disk tier with the fused experts kernel: "
                                     "a layer's experts, within a tenth of host_memory)", minimum=1)
    # Same results, faster GEMMs; costs one pass over the weights at load.
    prepack: bool | None = option(None, "pack GEMM weights into oneDNN's layout at load (cpu, bf16/fp16, resident "
                                  "weights; default: whenever supported)", "bool")
    # Same results in float32 (it keeps the per-expert path); bf16 within the bf16 tolerances.
    # int8 is the one lossy choice: opt-in, never a default.
    experts_kernel: str = option("auto", "routed experts on the cpu: auto (one native call per MoE layer over "
                                 "weights packed at load where it is the faster path: AMX, or AVX-512 BF16 on AMD; bf16, resident), "
                                 "fused (the same, an error where it cannot), torch (one oneDNN GEMM chain per "
                                 "expert) or int8 (lossy: the experts' weights re-quantized to int8 per output column "
                                 "at load, activations per token, multiplied in int8 -- AVX-512 VNNI's rate is twice "
                                 "bf16's)", "choice", choices=("auto", "fused", "torch", "int8"))
    max_model_len: int | None = option(None, "longest sequence in tokens (default: the model's context)", minimum=1)
    # Same results (their K/V are the same numbers), less prefill; false recomputes every prompt.
    prefix_caching: bool = option(True, "keep full KV blocks of prompts and reuse them for prompts that start "
                                  "alike (few-shot examples, a multiple-choice context), computing only the rest",
                                  "bool")

    def __post_init__(self):
        for f in fields(self):
            opt = f.metadata["option"]      # errors use the public name (host_memory, not kv_cache_bytes)
            setattr(self, f.name, opt.checked(opt.name or f.name, getattr(self, f.name)))
        if self.num_buffers is not None and self.num_buffers < 2 and self.streaming != "resident":
            raise InputError("num_buffers must be >= 2: a layer's dense weights and one expert are held at once")
        if None not in (self.kv_cache_bytes, self.host_memory_bytes) and self.kv_cache_bytes >= self.host_memory_bytes:
            raise InputError(f"kv_cache_memory {format_bytes(self.kv_cache_bytes)} must be less than host_memory "
                             f"{format_bytes(self.host_memory_bytes)}, which holds it beside the weights")


def check_machine(cfg: EngineConfig) -> None:
    """What a config asks of this machine, checked before any work: its device exists, its KV
    budget fits the host memory. (A config alone may describe another machine: the planner makes
    CUDA plans for a 128 GB host on this one.)"""
    check_device(cfg.device)
    machine = host_memory_bytes()
    for name, size in (("host_memory", cfg.host_memory_bytes), ("kv_cache_memory", cfg.kv_cache_bytes)):
        if size is not None and size > machine:
            raise CapacityError(f"{name} {format_bytes(size)} is more than this machine has "
                                f"({format_bytes(machine)}); give at most that, or leave it unset")


def check_device(device: str) -> None:
    """"cpu" or "cuda[:N]" naming a device this machine has: found now, not at the first kernel."""
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise InputError(f"device must be cpu or cuda[:N], got {device!r}")
    import torch
    if not torch.cuda.is_available():
        raise InputError(f"device {device!r}: no CUDA device is available on this machine (use --device cpu)")
    if index and int(index) >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def engine_config(device, host_memory, device_memory, overrides: dict) -> EngineConfig:
    """The constructors' user-facing sizes ("8GB") -> an EngineConfig (the config reads them) that
    this machine can run, checked before a checkpoint is loaded."""
    by_name = {f.metadata["option"].name or f.name: f.name for f in fields(EngineConfig)}   # public -> field
    overrides = {by_name.get(name, name): value for name, value in overrides.items()}
    cfg = EngineConfig(device=device, host_memory_bytes=host_memory, device_memory=device_memory, **overrides)
    check_machine(cfg)
    return cfg
