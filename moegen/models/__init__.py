"""Model families and the shared model class. `load_model(path, dtype)` reads a checkpoint."""
from moegen.models.model import DecoderLayer, MoEModel
from moegen.models.registry import SUPPORTED_MODEL_TYPES


def load_model(path, dtype="float32") -> MoEModel:
    from moegen.loader import load_model as _load
    return _load(path, dtype)


__all__ = ["DecoderLayer", "MoEModel", "SUPPORTED_MODEL_TYPES", "load_model"]
