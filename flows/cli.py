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
import logging
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


USER_MISTAKE, FAULT = 2, 1       # exit statuses, as the moegen command's


def run_flow_from_argv(flow, show: Callable[[dict], None] | None = None, argv: list[str] | None = None) -> dict:
    """Parse parameters from the command line, check them against the flow's signature and types
    before it starts (an unknown name, a value of the wrong type: one line, exit 2), run the flow,
    print its summary. A flow run that fails on a user's mistake exits 2, on anything else 1."""
    from prefect.exceptions import ParameterTypeError

    exit_on_sigterm()
    try:
        params = parse_params(sys.argv[1:] if argv is None else argv)
        check_parameters(flow, params)
    except InputError as e:
        fail(f"{flow.name}: error: {e}", USER_MISTAKE)
    try:
        state = flow(**params, return_state=True)
    except InputError as e:                       # Prefect's own checks, should ours have missed one
        fail(f"{flow.name}: error: {e}", USER_MISTAKE)
    except ParameterTypeError as e:
        fail(f"{flow.name}: error: {e}", USER_MISTAKE)
    if not state.is_completed():
        fail(f"{flow.name}: flow run {state.name}: {state.message}", failure_status(state))
    summary = state.result()
    if show is not None:
        show(summary)
    else:
        print(json.dumps(summary, indent=1, default=str))
    return summary


def check_parameters(flow, params: dict) -> None:
    """Prefect's own checks (names bound to the signature, values validated against the
    parameters' types), run before the flow: their errors as InputError."""
    from prefect.exceptions import ParameterBindError, ParameterTypeError, SignatureMismatchError

    unknown = sorted(set(params) - set(flow.parameters.properties))
    if unknown:
        raise InputError(f"unknown parameter(s) {', '.join(unknown)}; the flow takes "
                         f"{', '.join(flow.parameters.properties)}")
    flows_log = logging.getLogger("prefect.flows")
    disabled, flows_log.disabled = flows_log.disabled, True      # it would log the same, at length
    try:
        flow.validate_parameters(params)
    except (ParameterBindError, ParameterTypeError, SignatureMismatchError) as e:
        lines = [line.strip().removeprefix("- ") for line in str(e).splitlines() if line.strip()]
        problems = lines[1:] if len(lines) > 1 and lines[0].endswith(":") else lines
        raise InputError(f"invalid parameters: {'; '.join(problems)}") from None
    finally:
        flows_log.disabled = disabled


def failure_status(state) -> int:
    """2 when the flow failed on a user's mistake (a MoegenError other than a MachineFault), else 1."""
    from moegen.errors import MoegenError
    try:
        state.result(raise_on_failure=True)
    except MoegenError as e:
        return e.exit_status
    except BaseException:  # noqa: BLE001 -- any other failure is the machine's or a bug: 1
        return FAULT
    return FAULT


def fail(message: str, status: int) -> None:
    print(message, file=sys.stderr)
    sys.exit(status)
