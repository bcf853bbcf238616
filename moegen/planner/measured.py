"""The engine's default planner: the plan search over this machine's measured hardware constants.

A planner is any object with `plan(model_config, job, overrides) -> (Plan, Prediction)`: the
engine hands it its model's config, the call's JobShape and the settings it fixes (its config's,
its KV cache budget and block size), and runs what comes back.
"""
import logging

from moegen.planner.cost_model import JobShape, Prediction
from moegen.planner.hardware import Hardware
from moegen.planner.model_spec import ModelSpec
from moegen.planner.plan import Plan
from moegen.planner.probe import default_cache_path, probe
from moegen.planner.search import search

log = logging.getLogger("moegen")


class MeasuredPlanner:
    """Plans from the probe of `device` ("cpu", "cuda" or "cuda:N": that GPU), measured on first
    use and cached per machine (moegen.planner.probe); with `disk_path` (a checkpoint whose weights
    stream from disk), also from its disk's read bandwidth (moegen.planner.disk_probe)."""

    def __init__(self, device: str, disk_path=None):
        self.device, self.disk_path = device, disk_path
        self._hardware: Hardware | None = None

    @property
    def hardware(self) -> Hardware:
        if self._hardware is None:
            if not default_cache_path(self.device).exists():
                log.warning("measuring this machine once for the planner (cached in %s)",
                            default_cache_path(self.device))
            self._hardware = Hardware.from_probe(probe(self.device))
            if self.disk_path is not None:
                from moegen.planner.disk_probe import disk_read
                self._hardware = self._hardware.replace(disk_read_gbps=disk_read(self.disk_path)["gbps"])
        return self._hardware

    def plan(self, model_config, job: JobShape, overrides: dict) -> tuple[Plan, Prediction]:
        """overrides: the Plan choices the engine fixes, its device budget (device_memory_bytes:
        what it keeps resident, buffers and activations in) and its host budget
        (host_memory_bytes), so the plan is made in those budgets."""
        fixed = dict(overrides)
        device_bytes = fixed.pop("device_memory_bytes", None)
        host_bytes = fixed.pop("host_memory_bytes", None)
        return search(ModelSpec.from_config(model_config), self.hardware, job, host_bytes, device_bytes,
                      overrides=fixed)
