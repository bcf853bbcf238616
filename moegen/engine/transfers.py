"""Decode's per-layer traffic between the device and the CPU attention, through pinned staging
buffers with non-blocking copies.

With decode attention on the CPU over the host KV cache, each layer sends q and the new K/V (or
MLA's absorbed query and latent) of every micro-batch to the host, and each micro-batch's output
back. Copies from pageable memory block the CPU and cannot overlap; here every tensor crosses
through a pinned buffer kept from layer to layer (it grows, never per layer), and all micro-batches'
device->host copies are queued at once on a copy stream, so the next micro-batch's K/V arrive
while the CPU attends this one, and each output goes back while the next one is computed.

On the CPU (the engine's device is the host) nothing is staged, unless a stand-in allocator is
given (tests): then the same buffers and order are used, with synchronous copies.
"""
import math

import torch


class HostStaging:
    def __init__(self, device, alloc=None):
        """alloc(nbytes) -> uint8 host tensor: the pinned allocator by default."""
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.active = self.cuda or alloc is not None
        self.alloc = alloc or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        self.buffers: dict[str, torch.Tensor] = {}
        self.pending: dict[str, object] = {}   # buffer name -> event of the last device copy through it
        self._copy_stream = None

    @property
    def copy_stream(self):
        if self._copy_stream is None:        # made on first use: an engine built without a call needs none
            self._copy_stream = torch.cuda.Stream(self.device)
        return self._copy_stream

    def _host(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """A pinned tensor of `shape` in buffer `name`, once no copy through it is in flight."""
        event = self.pending.pop(name, None)
        if event is not None:
            event.synchronize()
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < nbytes:
            grown = max(nbytes, 2 * buf.numel()) if buf is not None else nbytes
            buf = self.buffers[name] = self.alloc(grown)
        return buf[:nbytes].view(dtype).view(shape)

    def to_host(self, tensors, micro_batches):
        """Queue the copies of every micro-batch's rows of `tensors` (device, first dim = sequences)
        to the host; yields per micro-batch its host rows, each once they have arrived."""
        if not self.active:
            for mb in micro_batches:
                yield [t[mb] for t in tensors]
            return
        hosts = [self._host(f"in{i}", t.shape, t.dtype) for i, t in enumerate(tensors)]
        events = []
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))   # they are computed there
            with torch.cuda.stream(self.copy_stream):
                for mb in micro_batches:
                    for h, t in zip(hosts, tensors):
                        h[mb].copy_(t[mb], non_blocking=True)
                    events.append(torch.cuda.Event())
                    events[-1].record(self.copy_stream)
            for t in tensors:
                t.record_stream(self.copy_stream)      # keep their memory until the copies are done
        else:
            for h, t in zip(hosts, tensors):
                h.copy_(t)
            events = [None] * len(micro_batches)
        for mb, event in zip(micro_batches, events):
            if event is not None:
                event.synchronize()
            yield [h[mb] for h in hosts]

    def to_device(self, outs, micro_batches, shape, dtype: torch.dtype) -> torch.Tensor:
        """The host outputs of each micro-batch (an iterable, computed one by one) in one device
        tensor of `shape`: each is sent while the next one is being computed."""
        if not self.active:
            return torch.cat(list(outs)).to(self.device, dtype)
        host = self._host("out", shape, dtype)
        result = torch.empty(shape, dtype=dtype, device=self.device)
        for mb, out in zip(micro_batches, outs):
            host[mb].copy_(out)
            result[mb].copy_(host[mb], non_blocking=True)
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.pending["out"] = event
        return result
