"""Weight streaming: modules' weights copied into a bounded pool of device buffers ahead of use.

Weights are grouped into modules: "model" (embeddings, final norm, lm_head), one dense group per
layer ("model.layers.N": attention, norms, router, shared experts) and one group per expert
("...experts.E"). Resident modules are used in place; streamed ones are copied, in the order the
runner announces them with `plan()`, into at most `num_buffers` buffers. The runner announces the
experts of a layer only after routing, so experts that received no token are never copied.

Backends do the copies: `ResidentBackend` (everything in place, the CPU default), `StagedBackend`
(CPU: real copies into a bounded host pool, for tests of the scheduling and accounting),
`CudaBackend` (pinned host -> device on a copy stream, ordered with CUDA events) and
`moegen.engine.disk_tier.DiskBackend` (CPU: reads from the checkpoint files into the host pool).

A quantized weight (moegen.layers.quantized) moves as its stored tensors (FP8 crosses PCIe as
FP8, int4 as packed words) and is dequantized on the device at its GEMM.

Host memory, with a streaming backend: resident modules move to the device and their host copies
are dropped (a memory-mapped checkpoint's pages handed back); only the streamed modules keep a
host copy, which CUDA pins once (`pin_weights`): tensor by tensor into pinned slabs, each source
handed back as soon as it is copied, so the host never holds two copies of any weight.
"""
import re
from collections import Counter, OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from moegen.layers.quantized import map_tensors, stored_bytes, tensors_of

ALIGN = 64
SWAP_MARGIN = 0.25        # a streamed expert replaces a resident one when used this much more (admit_most_used)
# a swap reads its expert on the runner's thread, beside nothing: one a pass costs a pass next to
# nothing (measured: as many as the pool's buffers a pass cost 7% of a 4-layer disk-tier run whose
# routing was uniform, for no fewer reads) and still follows a skew within a few dozen passes
SWAPS_PER_PASS = 1
SLAB_BYTES = 1 << 30      # pinned host memory is allocated in slabs of this (a power of two: see pin_weights)
EXPERT_GROUP = re.compile(r"^(.*\.experts\.\d+)\.")
LAYER_GROUP = re.compile(r"^(model\.layers\.\d+)\.")


def module_key(name: str) -> str:
    for pattern in (EXPERT_GROUP, LAYER_GROUP):
        m = pattern.match(name)
        if m:
            return m.group(1)
    return "model"


def group_weights(weights: dict) -> "OrderedDict[str, dict]":
    groups = OrderedDict()
    for name, t in weights.items():
        groups.setdefault(module_key(name), {})[name] = t
    return groups


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def module_bytes(tensors: dict) -> int:
    """Bytes of a module in a streaming buffer: each stored tensor aligned."""
    return sum(_aligned(t.numel() * t.element_size()) for w in tensors.values() for t in tensors_of(w))


@dataclass
class StreamStats:
    bytes_moved: int = 0
    copies: list = field(default_factory=list)      # module keys in copy order
    max_buffers_in_use: int = 0

    def reset(self):
        self.bytes_moved, self.copies, self.max_buffers_in_use = 0, [], 0


class ResidentBackend:
    """No copies: every module is used where it lives."""
    streams = False


class StagedBackend:
    """CPU stand-in for a device: real copies into pool buffers, completed synchronously.
    pin_alloc: a stand-in for the pinned allocator (tests): given, the streamed weights' host
    copies are moved into slabs from it, as CudaBackend pins them."""
    streams = True
    device = torch.device("cpu")

    def __init__(self, pin_alloc=None):
        self.pin_alloc = pin_alloc

    def prepare_host(self, weights: dict, names: list, release=None) -> list[int]:
        return pin_weights(weights, release, names=names, alloc=self.pin_alloc) if self.pin_alloc else []

    def alloc(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy(self, buffer, tensors, ready_after=None):
        views = _pack(buffer, tensors)
        return views, None

    def wait(self, event):
        pass

    def abandon(self, event):
        """A copy whose module is cancelled unused: what its buffer's next copy must follow."""
        return event

    def compute_done(self):
        return None


class CudaBackend:
    """Pinned host -> device copies on a side stream. A buffer is refilled only after the compute
    stream has finished with its previous contents (event), and compute waits for the copy."""
    streams = True

    def __init__(self, device):
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device)

    def prepare_host(self, weights: dict, names: list, release=None) -> list[int]:
        """Only pinned host memory copies asynchronously: pin the streamed weights, in place."""
        return pin_weights(weights, release, names=names)

    def alloc(self, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, buffer, tensors, ready_after=None):
        with torch.cuda.stream(self.copy_stream):
            if ready_after is not None:
                self.copy_stream.wait_event(ready_after)
            views = _pack(buffer, tensors, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return views, event

    def wait(self, event):
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def abandon(self, event):
        return event        # the next copy into its buffer is queued behind it on the copy stream

    def compute_done(self):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


class _Carver:
    """Hands out aligned views of consecutive bytes of `buffer`."""

    def __init__(self, buffer):
        self.buffer, self.offset = buffer, 0

    def fits(self, nbytes: int) -> bool:
        return self.offset + nbytes <= self.buffer.numel()

    def take(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        view = self.buffer[self.offset:self.offset + n].view(t.dtype).view(t.shape)
        self.offset += _aligned(n)
        return view


def carve(buffer, tensors) -> dict:
    """Views of `buffer` laid out for `tensors` (each stored tensor aligned), contents untouched."""
    carver = _Carver(buffer)
    return {name: map_tensors(w, carver.take) for name, w in tensors.items()}


def _pack(buffer, tensors, non_blocking=False):
    views = carve(buffer, tensors)
    for name, w in tensors.items():
        for dst, src in zip(tensors_of(views[name]), tensors_of(w)):
            dst.copy_(src, non_blocking=non_blocking)
    return views


def _slab_size(need: int, remaining: int, slab_bytes: int) -> int:
    """A power of two: at least `need`, else the largest not above what is left to place (so the
    last slabs shrink with the remainder), at most slab_bytes."""
    fit = 1 << (need - 1).bit_length() if need > 1 else 1
    return max(fit, min(slab_bytes, 1 << (remaining.bit_length() - 1)))


def pin_weights(weights: dict, release=None, slab_bytes: int = SLAB_BYTES, alloc=None,
                names=None) -> list[int]:
    """Move the weights `names` of `weights` (default all; in place, in order) into pinned host
    slabs; returns the slab sizes. Each source is replaced as soon as it is copied and, if given, `release(tensor)`
    hands its pages back (a memory-mapped checkpoint), so at most one extra tensor is ever held.
    Slabs, not one pinned allocation per tensor: torch's pinned allocator rounds each allocation
    up to a power of two (up to 2x the model); slabs are powers of two, filled in order, so only
    the tails they cannot fit the next tensor into are wasted. alloc(nbytes) -> uint8 tensor
    (default: pinned)."""
    alloc = alloc or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
    names = list(weights) if names is None else list(names)
    needs = {name: sum(_aligned(t.numel() * t.element_size()) for t in tensors_of(weights[name])) for name in names}
    remaining, carver, slabs = sum(needs.values()), None, []
    for name in names:
        w = weights[name]
        if all(t.is_pinned() for t in tensors_of(w)):     # pinned already (another engine did it)
            remaining -= needs[name]
            continue
        if carver is None or not carver.fits(needs[name]):
            slabs.append(_slab_size(needs[name], remaining, slab_bytes))
            carver = _Carver(alloc(slabs[-1]))

        def place(t):
            view = carver.take(t)
            view.copy_(t)
            return view
        weights[name] = map_tensors(w, place)
        remaining -= needs[name]
        if release is not None:
            for t in tensors_of(w):
                release(t)
        del w
    return slabs


class WeightStreamer:
    def __init__(self, weights: dict, backend=None, resident: set | None = None, num_buffers: int = 4,
                 release=None):
        """weights: the model's dict, changed in place with a streaming backend (resident weights
        replaced by their device copies, streamed ones by the backend's host copies). release(t):
        hands back the pages of a replaced memory-mapped tensor (moegen.loader.MappedPages)."""
        self.backend = backend or ResidentBackend()
        self.all_weights = weights
        keys = {module_key(n) for n in weights}
        self.resident = keys if not self.backend.streams else (set(resident or ()) | {"model"}) & keys
        if self.backend.streams:
            self._place_resident(weights, release)
            self.pinned_slabs = self.backend.prepare_host(
                weights, [n for n in weights if module_key(n) not in self.resident], release)
        self.groups = group_weights(weights)
        streamed = [k for k in self.groups if k not in self.resident]
        self.buffer_bytes = max((module_bytes(self.groups[k]) for k in streamed), default=0)
        self.free = deque(self.backend.alloc(self.buffer_bytes) for _ in range(num_buffers if streamed else 0))
        self.num_buffers = len(self.free)
        self.released_at = {}                      # id(buffer) -> event after which it may be refilled
        self.loaded: dict[str, tuple] = {}         # key -> (buffer, views, copy event)
        self.upcoming: deque[str] = deque()
        self.users: dict[str, int] = {}
        # experts whose uses are counted (admit_most_used): none unless the backend can make one resident
        self.swappable = frozenset(k for k in self.groups if EXPERT_GROUP.match(k + ".")) \
            if hasattr(self.backend, "read_resident") else frozenset()
        self.uses: Counter = Counter()              # expert key -> passes it ran in
        self.stats = StreamStats()
        self._disk_base = self._disk_totals()

    def _place_resident(self, weights: dict, release) -> None:
        """Resident weights onto the device, one tensor at a time, each host copy dropped (and its
        checkpoint pages handed back) as soon as its device copy exists."""
        dev = self.backend.device
        for name in [n for n in weights if module_key(n) in self.resident]:
            old = weights[name]
            weights[name] = map_tensors(old, lambda t: t.to(dev))
            if release is not None:
                for before, after in zip(tensors_of(old), tensors_of(weights[name])):
                    if after is not before:
                        release(before)
            del old

    @property
    def host_bytes(self) -> int:
        """Host memory the weights hold: the streamed modules' copies (all of them on the CPU)."""
        return sum(module_bytes(g) for k, g in self.groups.items() if self.backend.streams is False or
                   k not in self.resident)

    @property
    def resident_bytes(self) -> int:
        """Device memory the resident modules hold (0 on the CPU)."""
        if not self.backend.streams:
            return 0
        return sum(module_bytes(self.groups[k]) for k in self.resident)

    def _disk_totals(self) -> tuple:
        return getattr(self.backend, "bytes_read", 0), getattr(self.backend, "wait_s", 0.0)

    @property
    def disk_bytes_read(self) -> int:
        """Bytes read from the checkpoint files since the stats were last reset (the disk tier)."""
        return self._disk_totals()[0] - self._disk_base[0]

    @property
    def disk_wait_s(self) -> float:
        """Time the runner waited for those reads since the stats were last reset."""
        return self._disk_totals()[1] - self._disk_base[1]

    def reset_stats(self) -> None:
        self.stats.reset()
        self._disk_base = self._disk_totals()

    def weights(self, key: str) -> dict:
        """Resident weights of a module (no streaming involved)."""
        return self.groups[key]

    def plan(self, keys) -> None:
        """Announce the modules about to be used, in order; copies start as buffers allow."""
        self.upcoming.extend(k for k in keys if k not in self.resident)
        self._prefetch()

    def _prefetch(self):
        while self.upcoming and self.free:
            key = self.upcoming.popleft()
            if key in self.loaded:
                continue
            buffer = self.free.popleft()
            views, event = self.backend.copy(buffer, self.groups[key], self.released_at.pop(id(buffer), None))
            self.loaded[key] = (buffer, views, event)
            self.stats.bytes_moved += sum(stored_bytes(w) for w in self.groups[key].values())
            self.stats.copies.append(key)
            self.stats.max_buffers_in_use = max(self.stats.max_buffers_in_use, self.num_buffers - len(self.free))

    def cancel(self, keys) -> None:
        """Modules announced that will not be used after all (experts prefetched before routing
        that got no token): a queued one leaves the queue, a loaded one frees its buffer."""
        for key in keys:
            if key in self.upcoming:
                self.upcoming.remove(key)
            elif key in self.loaded and key not in self.users:
                # never used since its copy began, which may still be in flight (a disk read on
                # another reader thread): the buffer is refilled only after that copy has landed
                buffer, _, copied = self.loaded.pop(key)
                self.released_at[id(buffer)] = self.backend.abandon(copied)
                self.free.append(buffer)
        self._prefetch()

    def acquire(self, key: str) -> dict:
        if key in self.swappable:
            self.uses[key] += 1
        if key in self.resident:
            return self.weights(key)
        if key not in self.loaded:
            if key in self.upcoming:
                self.upcoming.remove(key)
            self.upcoming.appendleft(key)
            if not self.free:
                raise RuntimeError(f"weight pool exhausted acquiring {key}: release modules or add buffers")
            self._prefetch()
        buffer, views, event = self.loaded[key]
        self.backend.wait(event)
        self.users[key] = self.users.get(key, 0) + 1
        return views

    def release(self, key: str) -> None:
        if key in self.resident:
            return
        self.users[key] -= 1
        if self.users[key]:
            return
        del self.users[key]
        buffer, _, _ = self.loaded.pop(key)
        self.released_at[id(buffer)] = self.backend.compute_done()
        self.free.append(buffer)
        self._prefetch()

    def admit_most_used(self, max_swaps: int, margin: float = SWAP_MARGIN) -> int:
        """Resident experts swapped for streamed ones used more often (in more passes) so far: the
        reads each pass needs go down where routing is skewed, as real models' is. Only between
        passes, only modules with no buffer, copy or user in flight; each admitted expert is read
        into memory of its own as its pool copy would be laid out (bit for bit the same weights),
        each evicted one becomes its streamed template again, so resident bytes stay the same
        (a model's experts are of one size). A streamed expert must be used `margin` more than the
        resident one it replaces, so that near-equal counts do not swap back and forth. Returns
        the number of swaps; backends that cannot read a module on their own swap nothing."""
        if not self.swappable or self.users or self.loaded:
            return 0
        # ties broken by name: the same swaps whatever the set's (hash-seeded) order
        held = sorted((k for k in self.swappable if k in self.resident), key=lambda k: (self.uses[k], k))
        wanted = sorted((k for k in self.swappable if k not in self.resident), key=lambda k: (-self.uses[k], k))
        swaps = 0
        for out, into in zip(held, wanted):
            if swaps == max_swaps or self.uses[into] <= (1 + margin) * self.uses[out] + 1:
                break
            self.groups[out] = {name: self.backend.template(name) for name in self.groups[out]}
            self.stats.bytes_moved += sum(stored_bytes(w) for w in self.groups[into].values())   # read as a copy is
            self.groups[into] = self.backend.read_resident(self.groups[into])
            for key in (out, into):
                self.all_weights.update(self.groups[key])
            self.resident.discard(out)
            self.resident.add(into)
            swaps += 1
        return swaps

    @contextmanager
    def module(self, key: str):
        weights = self.acquire(key)
        try:
            yield weights
        finally:
            self.release(key)
