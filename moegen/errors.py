"""Exceptions raised by moegen. Every message names the file, tensor or field at fault.

The command line reports one as a single line and exits with its `exit_status`: 2 for a user's
mistake (every MoegenError by default), 1 for a fault of the machine (MachineFault: a full disk,
an I/O error, an unreachable server), so that scripts can tell "fix your command" from "retry".
"""
import errno as _errno


class MoegenError(Exception):
    """Base class of every error moegen raises on bad input."""
    exit_status = 2


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


class OutputBusyError(InputError):
    """Another process is writing the same output (it holds the journal's lock)."""


class MachineFault(MoegenError):
    """The machine failed, not the command: disk full, an I/O error, an output that vanished
    under a running command, a database server that cannot be reached."""
    exit_status = 1


# errnos that mean the storage failed rather than the command being wrong
STORAGE_ERRNOS = {_errno.ENOSPC: "disk full", _errno.EDQUOT: "disk quota exceeded", _errno.EIO: "I/O error",
                  _errno.EROFS: "file system is read-only", _errno.EFBIG: "file too large"}


def storage_fault(e: OSError, what: str, after: str = "") -> MoegenError:
    """A MachineFault for an OSError of the storage (disk full, I/O error), an InputError for any
    other (permission denied, a missing folder: the path the user gave). `what` names the file."""
    reason = STORAGE_ERRNOS.get(e.errno)
    if reason is None:
        return InputError(f"{what}: {e.strerror or e}{after}")
    return MachineFault(f"{what}: {reason} ({e.strerror or e}; a fault of the machine, not of the command){after}")
