"""Model families and the shared model class; `moegen.loader.load_model(path, dtype)` reads a checkpoint."""
from moegen.models.model import DecoderLayer, MoEModel
from moegen.models.registry import SUPPORTED_MODEL_TYPES

__all__ = ["DecoderLayer", "MoEModel", "SUPPORTED_MODEL_TYPES"]
