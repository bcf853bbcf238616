"""The planner: model shape arithmetic, hardware probe, cost model and plan search."""
from moegen.planner.model_spec import SUPPORTED_MODEL_TYPES, GQASpec, MLASpec, ModelSpec

__all__ = ["SUPPORTED_MODEL_TYPES", "GQASpec", "MLASpec", "ModelSpec"]
