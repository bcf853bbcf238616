"""Run a flow in this process (Prefect's ephemeral API unless PREFECT_API_URL points at a server):

    python -m flows.eval limit=8 num_fewshot=0 'systems=["moegen"]'
    python -m flows.bench '{"workloads": ["synthetic:prompt=64,gen=16,n=32"]}'

Arguments are a JSON object, or key=value pairs whose values are JSON (else plain strings).

Without PREFECT_API_URL, Prefect starts a temporary API server as a child process and stops it
at exit. SIGTERM and SIGINT end the flow through a normal exit, so that server stops too. kill -9
cannot be caught: the server shares the flow's process group, so end both with
`kill -9 -- -<pgid>` (`ps -o pgid= <pid>`), never the flow's pid alone.
"""
from __future__ import annotations

import json
import signal
import sys
from typing import Callable

from moegen.errors import InputError


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_params(argv: list[str]) -> dict:
    if len(argv) == 1 and argv[0].lstrip().startswith("{"):
        params = parse_value(argv[0])
        if not isinstance(params, dict):
            raise InputError(f"not a JSON object: {argv[0]}")
        return params
    params = {}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or not key:
            raise InputError(f"flow parameter {arg!r} is not key=value (or pass one JSON object)")
        params[key.replace("-", "_")] = parse_value(value)
    return params


def exit_on_sigterm() -> None:
    """SIGTERM as a normal exit (status 143), so atexit handlers run: Prefect's temporary server is
    stopped by one, and the default SIGTERM action would skip it and leave the server running."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def run_flow_from_argv(flow, show: Callable[[dict], None] | None = None, argv: list[str] | None = None) -> dict:
    """Parse parameters from the command line, run the flow, print its summary."""
    from prefect.exceptions import ParameterTypeError

    exit_on_sigterm()

    try:
        params = parse_params(sys.argv[1:] if argv is None else argv)
        state = flow(**params, return_state=True)
    except (InputError, ParameterTypeError) as e:
        sys.exit(f"{flow.name}: error: {e}")
    if not state.is_completed():
        sys.exit(f"{flow.name}: flow run {state.name}: {state.message}")
    summary = state.result()
    if show is not None:
        show(summary)
    else:
        print(json.dumps(summary, indent=1, default=str))
    return summary
