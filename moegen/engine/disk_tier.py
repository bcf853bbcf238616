"""The disk tier: the weights host memory does not hold are read from the checkpoint's safetensors
files into the streaming pool, on a reader thread, one module ahead of their use.

What is read and when is the streamer's (moegen.engine.weight_stream): modules in the order the
runner announces them, a layer's experts only after routing (experts without tokens are never
read), into at most num_buffers buffers. `DiskBackend` does the reads: `copy` carves the module's
views in a free buffer and queues its read; `wait` blocks until the bytes are there. A weight the
engine uses as stored (a plain tensor in the model's dtype; an expert's gate and up, stacked) is
read straight into its view: one pread per file range, no copy, its pages dropped from the page
cache after the read. The others (a cast from the stored dtype, a quantized weight, which streams
as stored) are made by the loader's own producers over bytes read the same way and then copied
in, so every weight is exactly what an in-memory load holds. bf16 GEMM weights are then re-laid
out for oneDNN on the reader thread (as prepack does for resident ones at load), bit-identical.

Experts of `tiled` MoE layers (bf16 SiLU experts where the fused experts kernel runs: see
`tile_experts`) are read with O_DIRECT -- the disk's DMA straight into the reader's scratch, no
page cache to copy from or to drop -- and packed from there into their pool views in the kernel's
tiles; the layer then runs its experts in groups through the kernel (moegen.layers.moe).

Behind a GPU (`DiskToDeviceBackend`) the pool is the device's: a module in the files is read into
a reader's pinned staging buffer and copied on to the device from there. On the CPU, between
passes, the most used experts become resident (WeightStreamer.admit_most_used, by `read_resident`).

`host_layout` divides the host budget (EngineConfig.host_memory_bytes) between a runtime reserve,
activations, the KV cache, the pool and resident weights, and says whether the disk tier is on.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from moegen.errors import CapacityError
from moegen.layers.linear import pack_weight
from moegen.layers.quantized import tensors_of
from moegen.ops.experts import pack_tiles_into
from moegen.planner.memory import format_bytes
from moegen.planner.policy import DISK_KV_SHARE, DISK_READERS, HOST_KV_SHARE, choose_resident
from moegen.safetensors_files import DIRECT_ALIGN, DirectScratch, FileReads, HeaderReader



def is_skeleton(w) -> bool:
    """A weight not read yet (moegen.loader.Checkpoint): its tensors are on the meta device."""
    return any(t.is_meta for t in tensors_of(w))


class DiskBackend:
    """Host pool buffers filled from the checkpoint files by DISK_READERS threads: while one waits on
    the disk, another re-lays out what it read (modules are independent; the pool bounds how many
    are in flight)."""
    streams = True
    device = torch.device("cpu")

    def __init__(self, checkpoint, pack: bool = False, tiles: dict | None = None):
        self.checkpoint = checkpoint
        # streamed experts the reader packs into the fused kernel's tiles: name -> (its layer, part)
        self.tiles = tiles or {}
        # bf16 GEMM weights re-laid out for oneDNN by the reader, beside the compute (a plain one
        # would be re-laid out at every GEMM, in the compute's time): bit-identical results
        self.packed = (checkpoint.gemm_only if pack else set()) - set(self.tiles)
        self.scratch = threading.local()     # each reader's DirectScratch
        self.reads = FileReads()
        self.reader = HeaderReader(checkpoint.entries, self.reads)
        self.producers = checkpoint.producers(self.reader)
        self.extents = {}                    # name -> file ranges (None: produced), found once
        self.wait_s = 0.0                    # the runner's time blocked on reads (what the disk did not hide)
        # no torch.set_num_threads(1) here: it is process-wide, and left the compute on one core
        # (measured: the experts kernel at 0.6 instead of 1.8 TFLOP/s); the tile packer is serial
        self.thread = ThreadPoolExecutor(DISK_READERS, thread_name_prefix="moegen-disk")
        self.produce_lock = threading.Lock()   # the producers share one reader (its expert row)

    @property
    def bytes_read(self) -> int:
        return self.reads.bytes_read

    def prepare_host(self, weights: dict, names: list, release=None) -> list[int]:
        """Nothing to stage: the streamed weights stay in the files until read."""
        return []

    def alloc(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy(self, buffer, tensors, ready_after=None):
        """ready_after: the read that last filled `buffer`, if it may still be running (its module was
        cancelled unused): this read starts after it, else two readers would write the buffer at once."""
        from moegen.engine.weight_stream import carve
        views = carve(buffer, tensors)
        return views, self._after(ready_after, self._read, views)

    def _after(self, ready_after, fn, *args) -> Future:
        """fn(*args) on a reader thread once `ready_after` is over, without holding a reader while
        it waits (a reader blocked on another's read is a read fewer in flight: measured 10% of a
        disk-bound run). The Future returned is fn's."""
        if ready_after is None or ready_after.done():
            return self.thread.submit(fn, *args)
        chained = Future()

        def start(_):
            if chained.set_running_or_notify_cancel():      # else abandoned before it began
                self.thread.submit(fn, *args).add_done_callback(lambda done: _settle(chained, done))
        ready_after.add_done_callback(start)
        return chained

    def abandon(self, event):
        """A module cancelled unused: its read dropped if it has not begun (no bytes read for
        nothing); else the read to let finish before its buffer is filled again."""
        return None if event.cancel() else event

    def wait(self, event):
        if not event.done():
            t0 = time.perf_counter()
            wait([event])
            self.wait_s += time.perf_counter() - t0
        event.result()          # a read's error (a truncated file) surfaces here, in the caller

    def compute_done(self):
        return None

    @torch.inference_mode()         # the views were carved in the runner's inference mode
    def _read(self, views: dict) -> None:
        for name, view in views.items():
            if name not in self.extents:
                self.extents[name] = self.checkpoint.extents(name)
            if name in self.tiles:
                self._read_tiles(name, view)
            elif self.extents[name] is None:
                made = self._produce(name)
                for dst, src in zip(tensors_of(view), tensors_of(made)):
                    dst.copy_(src)
            else:
                flat, at = view.view(-1).view(torch.uint8), 0
                for extent in self.extents[name]:
                    self.reads.read_into(extent, flat[at:at + extent.nbytes])
                    at += extent.nbytes
            if name in self.packed and isinstance(view, torch.Tensor) and view.dim() == 2:
                views[name] = pack_weight(view)

    def read_resident(self, tensors: dict) -> dict:
        """A module read from the files into memory of its own, laid out as its pool copy would be
        (the kernel's tiles, oneDNN's layout): it is to stay resident (WeightStreamer.admit_most_used)."""
        from moegen.engine.weight_stream import carve, module_bytes
        views = carve(torch.empty(module_bytes(tensors), dtype=torch.uint8), tensors)
        self._read(views)
        return views

    def template(self, name: str):
        """What a streamed weight is until read: meta tensors of its layout in a pool buffer."""
        if name in self.tiles:
            moe, part = self.tiles[name]
            return tile_template(moe, part)
        return self.checkpoint.skeletons[name]

    def _produce(self, name: str):
        """A weight that takes more than its bytes (a cast, a quantized weight), by the loader's producer."""
        with self.produce_lock:
            self.reader.for_weight(name)
            return self.checkpoint.produce(name, self.producers[name])

    def _read_tiles(self, name: str, view: torch.Tensor) -> None:
        """An expert's weight read with O_DIRECT into this reader's scratch, then packed into its
        tiles in `view`; gate and up stored apart are packed from where they were read."""
        moe, part = self.tiles[name]
        extents = self.extents[name]
        if extents is None:
            moe.tile_expert(part, self._produce(name), out=view)
            return
        scratch = getattr(self.scratch, "value", None) or DirectScratch()
        self.scratch.value = scratch
        scratch.reset(sum(e.nbytes + 3 * DIRECT_ALIGN for e in extents))
        pieces = [self.reads.read_direct(e, scratch).view(torch.bfloat16) for e in extents]
        rows, cols = self.checkpoint.skeletons[name].shape
        if part == "gate_up" and len(pieces) == 2 and all(p.numel() == rows // 2 * cols for p in pieces):
            for half, piece in enumerate(pieces):
                pack_tiles_into(piece.view(rows // 2, cols), view[half])
            return
        plain = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        moe.tile_expert(part, plain.view(rows, cols), out=view)


class DiskToDeviceBackend:
    """The disk tier behind a device (disk -> host -> GPU): the streamer's buffers are the device's
    (`device_side`: a CudaBackend, or on the CPU a StagedBackend standing in for one). A module kept
    in host memory (pinned) is copied as the device side copies it; a module left in the files is
    read by the DiskBackend's readers into the reader's own staging buffer (pinned: the copy to the
    device is asynchronous) and copied to the device from there, on the reader thread. Host memory
    then holds the host-resident modules and one staging buffer a reader, never a device pool."""
    streams = True

    def __init__(self, disk: DiskBackend, device_side):
        self.disk, self.device_side = disk, device_side
        self.device = device_side.device
        self.staging = threading.local()

    @property
    def bytes_read(self) -> int:
        return self.disk.bytes_read

    @property
    def wait_s(self) -> float:
        return self.disk.wait_s

    def prepare_host(self, weights: dict, names: list, release=None) -> list[int]:
        """The host-resident modules pinned (the files' ones stay there until read)."""
        return self.device_side.prepare_host(weights, [n for n in names if not is_skeleton(weights[n])], release)

    def alloc(self, nbytes):
        return self.device_side.alloc(nbytes)

    def copy(self, buffer, tensors, ready_after=None):
        if not any(is_skeleton(w) for w in tensors.values()):      # in host memory: straight to the device
            return self.device_side.copy(buffer, tensors, self._settled(ready_after))
        from moegen.engine.weight_stream import carve
        return carve(buffer, tensors), self.disk.thread.submit(self._read_then_copy, buffer, tensors, ready_after)

    def wait(self, event):
        if isinstance(event, Future):
            self.disk.wait(event)       # the read (and a read's error) first, then the device copy it issued
            event = event.result()
        self.device_side.wait(event)

    def compute_done(self):
        return self.device_side.compute_done()

    def abandon(self, event):
        return self.disk.abandon(event) if isinstance(event, Future) else self.device_side.abandon(event)

    def _settled(self, ready_after):
        """A buffer's release condition as the device side takes it: a cancelled module's read (a
        Future) is waited for, and the device copy it issued is what to wait on."""
        return ready_after.result() if isinstance(ready_after, Future) else ready_after

    @torch.inference_mode()
    def _read_then_copy(self, buffer, tensors, ready_after):
        from moegen.engine.weight_stream import carve, module_bytes
        nbytes = module_bytes(tensors)
        staging = getattr(self.staging, "value", None)
        if staging is None or staging.numel() < nbytes:
            staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self.staging.value = staging
        host_views = carve(staging, tensors)
        self.disk._read(host_views)
        _, event = self.device_side.copy(buffer, host_views, self._settled(ready_after))
        if event is not None:
            event.synchronize()         # the staging buffer is this reader's next read's
        return event


def _settle(chained: Future, done: Future) -> None:
    if done.exception() is not None:
        chained.set_exception(done.exception())
    else:
        chained.set_result(done.result())


def tile_template(moe, part: str) -> torch.Tensor:
    return torch.empty(moe.tile_shapes()[part], dtype=torch.bfloat16, device="meta")


def tile_experts(layers, weights: dict, resident: frozenset) -> dict:
    """Each expert of `layers` (tileable MoE layers, see SparseMoE.can_tile) in the fused kernel's
    tiles: resident experts packed now (each plain copy dropped as its tiles exist), streamed ones
    replaced by meta templates of their tiles for the pool to carve. Returns every expert weight's
    name -> (layer, part), for the DiskBackend to read and pack (a resident one too, once it is
    swapped out for a more used one)."""
    from moegen.engine.weight_stream import module_key
    tiles = {}
    for moe in layers:
        for name in moe.expert_weight_names():
            part = name.rsplit(".", 1)[1]
            weights[name] = moe.tile_expert(part, weights[name]) if module_key(name) in resident \
                else tile_template(moe, part)
            tiles[name] = (moe, part)
        moe.tiled = True
    return tiles


# ---- the host budget ----------------------------------------------------------------------------

@dataclass(frozen=True)
class HostLayout:
    """How the host budget is spent. resident: the weight groups kept in memory (all of them when
    the disk tier is off); the rest stream from disk through pool_bytes of buffers."""
    budget_bytes: int
    reserve_bytes: int
    activation_bytes: int
    kv_bytes: int
    pool_bytes: int
    resident: frozenset
    resident_bytes: int
    streamed_bytes: int

    @property
    def disk(self) -> bool:
        return self.streamed_bytes > 0

    def describe(self) -> str:
        tier = (f"disk tier on: {format_bytes(self.streamed_bytes)} of weights stream from disk through "
                f"{format_bytes(self.pool_bytes)} of buffers" if self.disk else "all weights in memory")
        return (f"host memory {format_bytes(self.budget_bytes)}: weights {format_bytes(self.resident_bytes)} resident, "
                f"KV cache {format_bytes(self.kv_bytes)}, activations {format_bytes(self.activation_bytes)}, "
                f"runtime {format_bytes(self.reserve_bytes)}; {tier}")


def host_layout(sizes: dict, budget_bytes: int, kv_bytes: int | None, pool_bytes: int, activation_bytes: int,
                reserve_bytes: int, min_kv_bytes: int) -> HostLayout:
    """The layout of `budget_bytes`. The weight groups (sizes: key -> bytes; "model" always
    resident) stay in memory if they fit beside the runtime reserve, activations and the KV cache
    (kv_bytes, or unset: at least HOST_KV_SHARE of the budget, then all that is left); else the
    disk tier: the pool, the KV cache (kv_bytes, or unset: DISK_KV_SHARE of what the reserve,
    activations, pool and embeddings leave) and what fits of the rest resident, dense groups first
    (every step needs them). A CapacityError says what does not fit, part by part."""
    total, fixed = sum(sizes.values()), reserve_bytes + activation_bytes
    wanted = kv_bytes if kv_bytes is not None else max(min_kv_bytes, int(HOST_KV_SHARE * budget_bytes))
    if fixed + total + wanted <= budget_bytes:
        kv = kv_bytes if kv_bytes is not None else budget_bytes - fixed - total
        return HostLayout(budget_bytes, reserve_bytes, activation_bytes, kv, 0, frozenset(sizes), total, 0)
    left = budget_bytes - fixed - pool_bytes - sizes["model"]
    kv = kv_bytes if kv_bytes is not None else max(min_kv_bytes, int(DISK_KV_SHARE * left))
    if left - kv < 0 or kv < min_kv_bytes:
        raise CapacityError(
            f"host memory {format_bytes(budget_bytes)} is too small for this model even with its weights streamed "
            f"from disk: the runtime ({format_bytes(reserve_bytes)}) + activations ({format_bytes(activation_bytes)}) "
            f"+ KV cache ({format_bytes(kv)}; one sequence needs {format_bytes(min_kv_bytes)}) + streaming buffers "
            f"({format_bytes(pool_bytes)}) + embeddings and lm_head ({format_bytes(sizes['model'])}) need "
            f"{format_bytes(fixed + kv + pool_bytes + sizes['model'])}; give --host-memory at least that"
            + ("" if kv_bytes is None else " or a smaller --kv-cache-memory"))
    rest = {k: v for k, v in sizes.items() if k != "model"}
    resident = choose_resident(rest, rest, left - kv) | {"model"}
    kept = sum(sizes[k] for k in resident)
    return HostLayout(budget_bytes, reserve_bytes, activation_bytes, kv, pool_bytes, frozenset(resident), kept,
                      total - kept)
