"""How an engine's weights are set up at its start: the host budget's layout (disk tier), the
modules kept on the device, the weight streamer, the KV cache's cap, and the CPU packings (oneDNN's
layout, the fused experts kernel). The Engine builds one WeightSetup and calls it once."""
import logging
import math
import time

import torch

from moegen.engine.config import EngineConfig
from moegen.engine.disk_tier import DiskBackend, DiskToDeviceBackend, HostLayout, host_layout, is_skeleton, tile_experts
from moegen.engine.memory import host_memory_bytes
from moegen.engine.weight_stream import (CudaBackend, ResidentBackend, StagedBackend, WeightStreamer, group_weights,
                                         module_bytes)
from moegen.errors import CapacityError, InputError
from moegen.layers.linear import packing_supported, prepack
from moegen.layers.quantized import is_quantized
from moegen.planner.memory import activation_bytes, engine_activation_reserve, format_bytes
from moegen.planner.model_spec import ModelSpec
from moegen.planner.policy import (DEFAULT_MAX_BATCH, DEFAULT_NUM_BUFFERS, DEFAULT_MAX_PREFILL_TOKENS, FALLBACK_SETTINGS, HOST_RESERVE_BYTES,
                                   choose_resident, default_device_budget_bytes, default_kv_cache_bytes, disk_num_buffers,
                                   device_reserve_bytes, disk_pool)


log = logging.getLogger("moegen")
DEQUANT_TEMPORARIES = 3    # float32 copies of a weight alive while it is dequantized (values, scales, result)


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


class WeightSetup:
    """The weight-layout choices of one engine: model, config and device in; a layout, a streamer
    and a KV budget out. device_budget_bytes: a streaming engine's device budget, once
    resident_modules chose (None otherwise)."""

    def __init__(self, model, config: EngineConfig, device: torch.device):
        self.model, self.config, self.device = model, config, device
        self.device_budget_bytes = None
        self.num_buffers = config.num_buffers or DEFAULT_NUM_BUFFERS    # the disk tier may choose more (host_layout)

    def host_layout(self, block_bytes: int) -> HostLayout | None:
        """How host_memory is spent (moegen.engine.disk_tier.host_layout), checked before any weight
        is read; None without a budget (every weight in memory, as loaded)."""
        cfg, weights = self.config, self.model.weights
        if cfg.host_memory_bytes is None:
            return None
        sizes = {k: module_bytes(g) for k, g in group_weights(weights).items()}
        spec = ModelSpec.from_model(self.model)
        tokens = cfg.max_prefill_tokens or DEFAULT_MAX_PREFILL_TOKENS
        act = activation_bytes(spec, tokens, min(tokens, DEFAULT_MAX_BATCH), tokens, self.model.dtype.itemsize, True)

        tiled = self.tiled_layers(weights)
        if cfg.num_buffers is None and tiled:
            expert = max((v for k, v in sizes.items() if ".experts." in k), default=0)
            self.num_buffers = disk_num_buffers(max(moe.n_experts for moe in tiled), expert, cfg.host_memory_bytes)

        def layout_for(dense_resident: bool) -> HostLayout:
            return host_layout(sizes, cfg.host_memory_bytes, cfg.kv_cache_bytes, self.pool_bytes(sizes, dense_resident),
                               act, HOST_RESERVE_BYTES, block_bytes)
        layout = layout_for(dense_resident=True)
        if layout.disk and any(".experts." not in k and k not in layout.resident for k in sizes):
            layout = layout_for(dense_resident=False)   # a dense group streams too: buffers of its size
        if layout.disk and self.model.checkpoint is None:
            raise CapacityError(f"{layout.describe()}; but this model's weights were made or loaded whole in "
                                "memory: open it with Engine.from_pretrained to stream them from its files")
        if layout.disk and cfg.streaming == "resident":
            raise InputError(f"{layout.describe()}: streaming=resident keeps every weight where it is loaded; "
                             "give a host_memory that holds the model, or streaming auto")
        log.info("%s", layout.describe())
        return layout

    def pool_bytes(self, sizes: dict, dense_resident: bool) -> int:
        """The disk tier's pool (policy.disk_pool) for module sizes `sizes` (key -> bytes): buffers
        of one expert where only experts stream, else of the largest module."""
        experts = max((v for k, v in sizes.items() if ".experts." in k), default=0)
        largest = max((v for k, v in sizes.items() if k != "model"), default=0)
        return disk_pool(self.num_buffers, experts, largest, self.packs() and not self.to_device(),
                         bool(self.tiled_layers(self.model.weights)), dense_resident, self.to_device())[0]

    def to_device(self) -> bool:
        """Whether the streamed weights go on to a device (CUDA, or the staged stand-in for one):
        the disk tier then reads through host staging into the device's buffers."""
        return self.device.type == "cuda" or self.config.streaming == "staged"

    def packs(self) -> bool:
        """Whether GEMM weights get oneDNN's layout (prepack; with the disk tier, after each read)."""
        return self.config.prepack is not False and packing_supported(self.model.dtype)

    def make_streamer(self, layout: HostLayout | None) -> WeightStreamer:
        cfg, weights = self.config, self.model.weights
        if cfg.experts_kernel == "int8" and self.to_device():
            raise InputError("experts_kernel=int8 runs the experts on the CPU, over weights held in host memory; "
                             f"not with weights streamed to {'the GPU' if self.device.type == 'cuda' else 'a device'} "
                             "(streaming=staged)")
        checkpoint = self.model.checkpoint
        if layout is not None and layout.disk and self.to_device():
            return self.disk_to_device_streamer(layout)
        if layout is not None and layout.disk:
            groups = group_weights(weights)
            todo = [n for k in layout.resident for n, w in groups[k].items() if is_skeleton(w)]
            tiled = self.tiled_layers(weights, strict=True)
            # plain GEMM weights packed straight from the mapped files (each one's pages handed back
            # as it is packed: a copy first would hold the resident weights twice); the rest copied
            # in, so resident weights never depend on the files again. Streamed ones the reader packs.
            packed = {n for n in self.model.linear_weight_names()
                      if self.packs() and isinstance(weights[n], torch.Tensor)} & set(todo)
            packed -= {n for moe in tiled for n in moe.expert_weight_names()}
            checkpoint.load(sorted(packed))
            if packed:
                self.prepack_weights(weights)
            checkpoint.load([n for n in todo if n not in packed], own=True)
            tiles = tile_experts(tiled, weights, layout.resident)
            if tiled:
                log.info("the experts of %d MoE layers run in the fused kernel, streamed ones packed as they are read",
                         len(tiled))
            return WeightStreamer(weights, DiskBackend(checkpoint, pack=self.packs(), tiles=tiles),
                                  resident=set(layout.resident), num_buffers=self.num_buffers)
        if checkpoint is not None:            # opened lazily (from_pretrained): read what is not yet
            checkpoint.load([n for n, w in weights.items() if is_skeleton(w)])
        streams = self.device.type == "cuda" or cfg.streaming == "staged"
        if streams and (any(t.is_mkldnn for t in weights.values()) or self.packed_layers()):
            raise InputError("this model's weights were packed for CPU GEMMs by another Engine (prepack, or the "
                             "fused experts kernel, exact or int8); load the model again for a streaming engine, or "
                             "build the first with prepack=False, experts_kernel='torch'")
        if streams:
            from moegen.loader import MappedPages
            backend = CudaBackend(self.device) if self.device.type == "cuda" else StagedBackend()
            groups = group_weights(weights)
            resident = set(groups) if cfg.streaming == "resident" else self.resident_modules(groups)
            return WeightStreamer(weights, backend, resident, self.num_buffers, release=MappedPages())
        self.fuse_experts(weights)
        if cfg.prepack is not False:
            self.prepack_weights(weights)
        return WeightStreamer(weights, ResidentBackend())

    def disk_to_device_streamer(self, layout: HostLayout) -> WeightStreamer:
        """Three tiers: what fits the device budget on the device (resident_modules), what the host
        layout keeps in host memory pinned there, the rest read from the files as it streams
        (DiskToDeviceBackend). The device's weights are read mapped, each tensor's pages handed back
        once on the device; the host's are copied in (then pinned), so the files never back them."""
        from moegen.loader import MappedPages
        weights, checkpoint = self.model.weights, self.model.checkpoint
        groups = group_weights(weights)
        on_device = self.resident_modules(groups)
        in_host = set(layout.resident) - on_device
        checkpoint.load([n for k in sorted(on_device) for n, w in groups[k].items() if is_skeleton(w)])
        checkpoint.load([n for k in sorted(in_host) for n, w in groups[k].items() if is_skeleton(w)], own=True)
        device_side = CudaBackend(self.device) if self.device.type == "cuda" else StagedBackend()
        backend = DiskToDeviceBackend(DiskBackend(checkpoint), device_side)
        log.info("disk tier behind %s: %d modules on it, %d in host memory, %d read from the files", self.device,
                 len(on_device), len(in_host), len(set(groups) - on_device - in_host))
        return WeightStreamer(weights, backend, resident=on_device, num_buffers=self.num_buffers,
                              release=MappedPages())

    def resident_modules(self, groups) -> set:
        """The modules kept on the device: the embeddings and lm_head always, then what fits
        (policy.choose_resident) in the device budget less its reserve (CUDA context, the
        activations of the largest pass, dequantization temporaries) and the buffer pool. The
        planner plans in the same budget with the same buffers (Engine._plan). Staged (a CPU stand-in)
        keeps only the top resident unless given a device_memory, and reserves nothing."""
        cfg = self.config
        sizes = {k: module_bytes(g) for k, g in groups.items()}
        pool = self.num_buffers * max((v for k, v in sizes.items() if k != "model"), default=0)
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
                             f"({format_bytes(sizes['model'])}) plus {self.num_buffers} streaming buffers "
                             f"({format_bytes(pool)}) and its reserve ({format_bytes(reserve)}): "
                             f"{format_bytes(-spare)} short")
        rest = {k: g for k, g in groups.items() if k != "model"}
        return choose_resident(rest, sizes, spare) | {"model"}

    def kv_budget_bytes(self, streamer: WeightStreamer) -> int:
        """The KV cache's cap: the config's, else the policy's share of RAM. With weights streamed
        from host memory, their host copies and the KV cache must fit RAM together: an unset
        budget shrinks to what is left, a set one that does not fit is refused."""
        ram, cfg = host_memory_bytes(), self.config
        budget = cfg.kv_cache_bytes or default_kv_cache_bytes(ram)
        if not streamer.backend.streams:
            return budget
        held = streamer.host_bytes
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

    def moe_layers(self):
        return [layer.ffn for layer in self.model.layers if layer.is_moe]

    def packed_layers(self, kind: str | None = None):
        """The MoE layers whose experts are packed for a native kernel: `kind` ("fused" or "int8"),
        or either."""
        return [moe for moe in self.moe_layers()
                if (k := moe.packed_kind(self.model.weights)) is not None and kind in (None, k)]

    def tiled_layers(self, weights, strict: bool = False) -> list:
        """With the disk tier, the MoE layers whose experts run in the fused kernel expert by expert
        (streamed ones packed as they are read): where the kernel would run in memory (see
        fuse_experts) and the experts are plain bf16 (quantized ones keep the per-expert path).
        strict: experts_kernel=fused that cannot run so is an error."""
        from moegen.ops.experts import auto_isa, chosen_isa
        wanted = self.config.experts_kernel
        if wanted == "int8":
            # the disk tier's reader packs streamed experts into the exact kernel's bf16 tiles only
            if strict:
                raise InputError("experts_kernel=int8 with the disk tier: streamed experts run in the exact "
                                 "kernel only; use experts_kernel auto or fused, or a host_memory that holds the model")
            return []
        if wanted == "torch" or self.to_device():      # the kernel is the CPU's
            return []
        isa = chosen_isa() if wanted == "fused" else auto_isa()
        layers = [moe for moe in self.moe_layers() if moe.can_tile(weights, self.model.dtype)]
        if strict and wanted == "fused" and (isa is None or len(layers) < len(self.moe_layers())):
            raise InputError("experts_kernel=fused with the disk tier: " + (
                "the native kernels are unavailable" if isa is None else
                f"streamed experts run in it as bf16 SiLU experts of a bfloat16 model, not these ({self.model.dtype})"))
        return layers if isa is not None else []

    def fuse_experts(self, weights) -> None:
        """Routed experts packed for the fused kernel (moegen.ops.experts) where it runs, or for the
        int8 one (experts_kernel=int8)."""
        from moegen.ops.experts import auto_isa, chosen_isa
        wanted = self.config.experts_kernel
        kind = "int8" if wanted == "int8" else "fused"      # the packing this engine runs (torch: none)
        for packed in ("fused", "int8"):
            if (packed != kind or wanted == "torch") and self.packed_layers(packed):
                raise InputError(f"this model's experts were packed for the {packed} experts kernel by another "
                                 f"Engine; load the model again for experts_kernel={wanted}")
        if wanted == "torch":
            return
        todo = [moe for moe in self.moe_layers() if moe.packed_kind(weights) is None]
        if wanted == "int8":
            self.pack_int8(weights, todo)
            return
        # auto: where the kernel beats oneDNN's per-expert GEMMs (ops.experts.auto_isa)
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

    def pack_int8(self, weights, todo: list) -> None:
        """experts_kernel=int8: each MoE layer's experts re-quantized to int8 for the int8 kernel
        (moegen.ops.experts.moe_experts_int8); an error where it cannot run."""
        from moegen.ops.experts import int8_isa
        isa = int8_isa()
        if isa is None:
            raise InputError("experts_kernel=int8: the native kernels are unavailable")
        if not all(moe.can_pack_int8(weights, self.model.dtype) for moe in todo):
            raise InputError(f"experts_kernel=int8: it runs SiLU experts of bfloat16 models (weights bf16 or "
                             f"quantized, in host memory), not these ({self.model.dtype})")
        if isa == "generic":
            log.warning("experts_kernel=int8 without AMX-INT8 or AVX-512 VNNI: the portable int8 kernel is "
                        "correct but slow")
        from moegen.loader import MappedPages
        t0, release = time.perf_counter(), MappedPages()
        for moe in todo:
            moe.pack_int8(weights, release=release)
        log.info("re-quantized the experts of %d MoE layers to int8 (lossy) for the %s kernel in %.1f s", len(todo),
                 isa, time.perf_counter() - t0)

    def prepack_weights(self, weights) -> None:
        if not packing_supported(self.model.dtype):
            if self.config.prepack:
                raise InputError(f"prepack=True needs oneDNN {self.model.dtype} GEMMs, which this CPU/torch lacks")
            return
        from moegen.loader import MappedPages
        t0 = time.perf_counter()
        # each plain weight's checkpoint pages go back as soon as its packed copy exists
        n = prepack(weights, self.model.linear_weight_names(), release=MappedPages())
        log.info("packed %d GEMM weights for oneDNN in %.1f s", n, time.perf_counter() - t0)
