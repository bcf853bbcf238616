"""The fallback of the moegen-resume-crashed automation (deployments/automations.yaml), which
deployments/serve.sh starts beside the worker: every INTERVAL_S seconds, flow runs tagged
resume-on-crash that have been Crashed for over GRACE_S seconds are scheduled again, as the
automation would have done. The automation acts on the Crashed *event*, and a Prefect server on
SQLite under load can lose it: its trigger processing failed with "database is locked" four times
and the message went to the dead-letter queue (seen in this project's crash test, 2026-12-07), and
the run then stayed Crashed forever -- the rows it had not written were never written. The grace
leaves the automation, which acts within a second, its turn; a run crashing over and over is ended
by the flow itself (flows.common.check_resume_limit), not here.

    python deployments/resume_crashed.py [--once] [--grace SECONDS]     (PREFECT_API_URL: the server)
"""
import argparse
import asyncio
import time
from datetime import datetime, timezone

TAG = "resume-on-crash"          # the deployments' tag the automation matches (deployments/prefect.yaml)
GRACE_S = 60.0
INTERVAL_S = 20.0


async def sweep(client, grace_s: float = GRACE_S) -> list:
    """Schedule again every resume-on-crash flow run Crashed for over grace_s; their ids."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                FlowRunFilterTags)
    from prefect.client.schemas.objects import StateType
    from prefect.states import Scheduled
    crashed = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])),
        tags=FlowRunFilterTags(all_=[TAG])))
    now, resumed = datetime.now(timezone.utc), []
    for run in crashed:
        if run.state is None or (now - run.state.timestamp).total_seconds() < grace_s:
            continue
        await client.set_flow_run_state(run.id, Scheduled(
            name="Resuming", message="crashed: scheduled again by deployments/resume_crashed.py (the "
                                     "moegen-resume-crashed automation did not act on it)"), force=True)
        resumed.append(run.id)
    return resumed


async def main(once: bool, grace_s: float) -> None:
    from prefect.client.orchestration import get_client
    while True:
        try:
            async with get_client() as client:
                for run_id in await sweep(client, grace_s):
                    print(f"{time.strftime('%H:%M:%S')} resumed crashed flow run {run_id}", flush=True)
        except Exception as e:      # noqa: BLE001 - the server restarting or busy: try again next round
            if once:
                raise
            print(f"{time.strftime('%H:%M:%S')} sweep failed ({type(e).__name__}: {e}); next in {INTERVAL_S:.0f} s",
                  flush=True)
        if once:
            return
        await asyncio.sleep(INTERVAL_S)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--once", action="store_true", help="one sweep, then exit")
    ap.add_argument("--grace", type=float, default=GRACE_S, help="seconds a run stays Crashed before it is resumed")
    args = ap.parse_args()
    asyncio.run(main(args.once, args.grace))
