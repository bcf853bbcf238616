"""Create the automations of deployments/automations.yaml on the Prefect server at PREFECT_API_URL,
replacing any of the same name (so serve.sh can run it every time without making duplicates).

    python deployments/automations.py [deployments/automations.yaml]
"""
import sys
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore

DEFAULT = Path(__file__).with_name("automations.yaml")


def apply(path: Path = DEFAULT) -> list[str]:
    """Each automation of the file, created or replaced; one already there as written is left as it
    is (replacing it would drop what a proactive trigger is waiting for, e.g. a missed heartbeat)."""
    automations = [AutomationCore.model_validate(item) for item in yaml.safe_load(path.read_text())["automations"]]
    with get_client(sync_client=True) as client:
        for automation in automations:
            existing = client.read_automations_by_name(automation.name)
            if [core(old) for old in existing] == [automation]:
                continue
            for old in existing:
                client.delete_automation(old.id)
            client.create_automation(automation)
    return [a.name for a in automations]


def core(automation) -> AutomationCore:
    """The definition of an automation read from the server (without its id and timestamps)."""
    return AutomationCore.model_validate(automation.model_dump(include=set(AutomationCore.model_fields)))


if __name__ == "__main__":
    for name in apply(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT):
        print(f"automation: {name}")
