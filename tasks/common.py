"""What every task module shares: when to retry, and how a cache key is made from task inputs."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import ValidationError

from moegen.errors import MachineFault, MoegenError

# Failures that another attempt cannot fix: the input itself is wrong.
BAD_INPUT = (MoegenError, ValidationError, FileNotFoundError, KeyError, TypeError)


def failure_of(state) -> BaseException | None:
    """The exception behind a Failed state, if any."""
    if isinstance(state.data, BaseException):
        return state.data
    try:
        result = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable result is simply not a known bad input
        return None
    return result if isinstance(result, BaseException) else None


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry transient failures, never bad input (MoegenError & co),
    except a MoegenError that is a fault of the machine (a database server down, a full disk):
    another attempt may find it mended."""
    failure = failure_of(state)
    return not isinstance(failure, BAD_INPUT) or isinstance(failure, MachineFault)


def stable_hash(value: Any) -> str:
    """sha256 of a JSON encoding with sorted keys (typed parameter models as their fields, paths and
    other objects as their str)."""
    blob = json.dumps(value, sort_keys=True, default=lambda v: v.model_dump() if hasattr(v, "model_dump") else str(v),
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def key_from_inputs(context, parameters: dict[str, Any]) -> str:
    """Prefect cache_key_fn: the task's name and all its inputs. Tasks that must not reuse a
    result across flow runs take a `scope` input (the flow run id unless the caller asks to resume
    another run), so the key changes with it."""
    return f"{context.task.name}-{stable_hash(parameters)}"
