"""Exceptions raised by moegen. Every message names the file, tensor or field at fault."""


class MoegenError(Exception):
    """Base class of every error moegen raises on bad input."""


class CheckpointError(MoegenError):
    """The checkpoint directory or one of its files is missing or unreadable."""


class ConfigError(MoegenError):
    """config.json is missing a field, has a bad value, or asks for something unsupported."""


class UnsupportedModelError(ConfigError):
    """config.json names a model_type moegen does not implement."""


class MissingTensorError(CheckpointError):
    """Tensors the model needs are absent from the checkpoint."""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint holds tensors the model does not use."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape differs from what the config implies."""


class DTypeError(MoegenError):
    """An unknown or unsupported dtype was requested."""


class TokenizerError(MoegenError):
    """The checkpoint has no usable tokenizer."""


class InputError(MoegenError):
    """A prompt or request is malformed (empty, too long, wrong type)."""


class CapacityError(InputError):
    """A request does not fit the memory it was given (e.g. one sequence's KV cache)."""


class NumericsError(MoegenError):
    """A model produced NaN or Inf (its weights, or the dtype, cannot represent the computation)."""
