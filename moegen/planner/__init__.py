"""The planner: model shape arithmetic, hardware probe, cost model and plan search."""
from moegen.planner.model_spec import GQASpec, MLASpec, ModelSpec

__all__ = ["GQASpec", "MLASpec", "ModelSpec"]
