"""What the flows share: the flow run's identity, where its report goes, and the machine it ran on."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from prefect.runtime import flow_run

from moegen.harness import results


def flow_run_id() -> str | None:
    return flow_run.get_id()


def cache_scope(resume_from: str | None) -> str:
    """The scope cached task results are keyed on: this flow run (so a retry of it reuses finished
    work), or the earlier flow run `resume_from` names (to finish what a crashed run started)."""
    return resume_from or flow_run_id() or "no-flow-run"


def report_dir(kind: str, url: str | None) -> Path:
    """<reports>/<kind>-<UTC time>-<flow run name>, beside the results database."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return results.reports_dir(url) / f"{kind}-{stamp}-{flow_run.get_name() or 'local'}"


def describe_environment(device: str, dtype: str = "bfloat16") -> dict:
    """Hardware, versions and git commit of this machine, in moegen.harness.bench's format (for flows
    that record runs without a bench result to take them from)."""
    from moegen.harness.bench import git_state, hardware, versions
    from moegen.harness.systems.peaks import hardware_peaks

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
