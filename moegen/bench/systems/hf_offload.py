"""System `hf-offload`: transformers with accelerate's device_map offloading (CUDA only).

The weights that do not fit `device_memory` (a size such as "20GB"; None = accelerate's own
choice, which offloads nothing when the model fits) stay in host memory and are moved to the GPU
layer by layer at each forward pass: model-based batching with offloading, as HF users run a model
too big for their GPU. Batching, greedy settings and timing as in hf-generate.
"""
from __future__ import annotations

from collections import Counter

import psutil
import torch

from moegen.engine.memory import parse_bytes
from moegen.bench.systems.base import SystemFailedError
from moegen.bench.systems.hf_common import hf_skip_reason, load_hf_model, make_handle
from moegen.bench.systems.hf_generate import HFGenerateSystem


class HFOffloadSystem(HFGenerateSystem):
    name = "hf-offload"
    description = "transformers generate() + accelerate device_map offloading to host memory"
    options = {**HFGenerateSystem.options, "device_memory": None, "host_memory": None}

    def skip_reason(self, model_path, device):
        if not str(device).startswith("cuda"):
            return f"needs a CUDA device (accelerate offloads from GPU to host memory); device is {device}"
        if not torch.cuda.is_available():
            return "needs CUDA, but torch.cuda.is_available() is False"
        try:
            import accelerate  # noqa: F401
        except ImportError as e:
            return f"needs accelerate ({e})"
        return hf_skip_reason(model_path)

    def load(self, model_path, dtype, device, workload, **options):
        index = torch.device(device).index or 0
        max_memory = {}
        if options["device_memory"] is not None:
            max_memory[index] = parse_bytes(options["device_memory"])
        if options["host_memory"] is not None:
            max_memory["cpu"] = parse_bytes(options["host_memory"])
        elif max_memory:            # a max_memory without "cpu" would leave the weights nowhere to go
            max_memory["cpu"] = psutil.virtual_memory().available
        model = load_hf_model(model_path, dtype, device_map="auto", max_memory=max_memory or None)
        # transformers dispatches (and sets hf_device_map) only when the map spans several devices;
        # otherwise the whole model sits on one device, which may be the CPU if the budget is tiny
        placement = dict(getattr(model, "hf_device_map", None) or {"": str(model.device)})
        gpu = next((v for v in placement.values() if str(v) not in ("cpu", "disk")), None)
        if gpu is None:
            raise SystemFailedError(f"{self.name}: with max_memory {max_memory} accelerate put no module on the GPU; "
                                    "the model would run on the CPU (raise device_memory)")
        run_on = f"cuda:{gpu}" if isinstance(gpu, int) else str(gpu)
        handle = make_handle(model, model_path, run_on, options)
        handle.info = {"max_memory": {str(k): v for k, v in max_memory.items()}, "runs_on": run_on,
                       "placement": dict(Counter(str(v) for v in placement.values()))}
        return handle
