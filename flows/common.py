"""What the flows share: the flow run's identity, where its report goes, and the machine it ran on."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from prefect.runtime import flow_run

from moegen.results import connection


def flow_run_id() -> str | None:
    return flow_run.get_id()


RESUME_LIMIT = 3          # crashed runs scheduled again (deployments/automations.yaml) at most this often


def check_resume_limit(limit: int = RESUME_LIMIT) -> None:
    """A flow run that crashed is scheduled again by the moegen-resume-crashed automation and
    resumes; one that keeps crashing (killed for memory every time) must not loop forever: after
    `limit` crashes it fails instead (a Failed run is not rescheduled)."""
    run_id = flow_run.get_id()
    if run_id is None or flow_run.get_run_count() <= 1:
        return                                   # a first run: nothing to count
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    from moegen.errors import MachineFault
    with get_client(sync_client=True) as client:
        crashes = sum(state.type == StateType.CRASHED for state in client.read_flow_run_states(run_id))
    if crashes > limit:
        raise MachineFault(f"flow run {flow_run.get_name()} crashed {crashes} times; not resuming it again (look for "
                           f"what kills it: memory, the machine) and retry it by hand: prefect flow-run retry {run_id}")


def is_resumed() -> bool:
    """Whether this flow run ran before (crashed, then scheduled again)."""
    return flow_run.get_id() is not None and flow_run.get_run_count() > 1


def cache_scope(resume_from: str | None) -> str:
    """The scope cached task results are keyed on: this flow run (so a retry of it reuses finished
    work), or the earlier flow run `resume_from` names (to finish what a crashed run started)."""
    return resume_from or flow_run_id() or "no-flow-run"


def report_dir(kind: str, url: str | None) -> Path:
    """<reports>/<kind>-<UTC time>-<flow run name>, beside the results database."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return connection.reports_dir(url) / f"{kind}-{stamp}-{flow_run.get_name() or 'local'}"


def describe_environment(device: str, dtype: str = "bfloat16") -> dict:
    """Hardware, versions and git commit of this machine, in moegen.bench.run's format (for flows
    that record runs without a bench result to take them from)."""
    from moegen.bench.run import git_state, hardware, versions
    from moegen.bench.systems.peaks import hardware_peaks

    peaks, _ = hardware_peaks(device, dtype, "off")
    return {"hardware": hardware(device, peaks, None), "versions": versions(), "git_commit": git_state()["commit"]}


def system_options(engine, extra: dict[str, dict], systems: list[str]) -> dict[str, dict]:
    """Each system's options: `extra[system]`, with the engine options for moegen (`extra` wins)."""
    from moegen.errors import ConfigError
    stray = sorted(set(extra) - set(systems))
    if stray:
        raise ConfigError(f"options given for system(s) not in the run: {', '.join(stray)}")
    options = {name: dict(extra.get(name, {})) for name in systems}
    if "moegen" in options:
        options["moegen"] = {**engine.set_options(), **options["moegen"]}
    return {name: opts for name, opts in options.items() if opts}
