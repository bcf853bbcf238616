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
    use and cached per machine (moegen.planner.probe)."""

    def __init__(self, device: str):
        self.device = device
        self._hardware: Hardware | None = None

    @property
    def hardware(self) -> Hardware:
        if self._hardware is None:
            if not default_cache_path(self.device).exists():
                log.warning("measuring this machine once for the planner (cached in %s)",
                            default_cache_path(self.device))
            self._hardware = Hardware.from_probe(probe(self.device))
        return self._hardware

    def plan(self, model_config, job: JobShape, overrides: dict) -> tuple[Plan, Prediction]:
        """overrides: the Plan choices the engine fixes, and its device budget (device_memory_bytes:
        what it keeps resident, buffers and activations in), so the plan is made in that budget."""
        fixed = dict(overrides)
        device_bytes = fixed.pop("device_memory_bytes", None)
        return search(ModelSpec.from_config(model_config), self.hardware, job, device_memory_bytes=device_bytes,
                      overrides=fixed)
