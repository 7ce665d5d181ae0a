"""Deployments of the retrain flow, served by `rlhf serve` (`rlhf_core.app.launch.serve`).

One deployment, `rlhf-retrain/retrain`, runs
- on a cron schedule (params.yaml `orchestration.schedule_cron`, default "0 3 * * *"), and
- when `rlhf ingest` adds rows to this project's store (the event
  `rlhf.preferences.ingested` with this store's resource id),
one run at a time: a run that arrives while another is running waits its turn (ENQUEUE).
Schedules and triggers need a Prefect server; `rlhf serve` starts one when none is configured.
"""

from __future__ import annotations

from pathlib import Path

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from rlhf_core.app.worker_project import ProjectCheckout
from rlhf_core.orchestration.store_versioning import (
    INGESTED_EVENT,
    PROJECT_LABEL,
    ingested_resource_id,
)
from rlhf_core.paths import ProjectPaths
from rlhf_core.scripts import load_script

retrain = load_script(Path(__file__).with_name("retrain.py")).retrain

DEPLOYMENT_NAME = "retrain"
ENTRYPOINT = "flows/retrain.py:retrain"  # relative to the project's checkout on each worker


def trigger_name(project_root: Path) -> str:
    """Name of the automation that starts the retrain of `project_root` on new data."""
    return f"rlhf retrain on new preference data in {project_root}"


def retrain_deployments(project_root: str, cron: str) -> list[RunnerDeployment]:
    """The retrain deployment for the project at `project_root` (absolute path)."""
    root = Path(project_root).resolve()
    store = ProjectPaths(root).preference_store
    on_new_data = DeploymentEventTrigger(
        name=trigger_name(root),
        expect={INGESTED_EVENT},
        match={"prefect.resource.id": ingested_resource_id(store)},
    )
    deployment = retrain.to_deployment(
        name=DEPLOYMENT_NAME,
        cron=cron,
        triggers=[on_new_data],
        parameters={"project_root": str(root)},
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        description=f"Retrain {root} on new preference data; promote only a better model.",
        tags=["rlhf"],
    )
    return [deployment]


def pool_deployment(project_name: str, cron: str) -> RunnerDeployment:
    """The retrain deployment for a work pool (`rlhf deploy`): the same schedule, trigger and
    one-at-a-time limit as `retrain_deployments`, with no path in it. Each worker runs it in
    its own checkout (RLHF_PROJECT_ROOT, `ProjectCheckout`), and it answers the ingest events
    labelled with the project's name (`project_name_of`), from whichever machine."""
    on_new_data = DeploymentEventTrigger(
        name=f"rlhf retrain of project {project_name} on new preference data",
        expect={INGESTED_EVENT},
        match={"prefect.resource.id": "rlhf.preferences.*", PROJECT_LABEL: project_name},
    )
    deployment = retrain.to_deployment(
        name=f"{DEPLOYMENT_NAME}-{project_name}",
        cron=cron,
        triggers=[on_new_data],
        parameters={"project_root": "."},
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        description=f"Retrain project {project_name} on new preference data, in the "
        "worker's checkout (RLHF_PROJECT_ROOT); promote only a better model.",
        tags=["rlhf", project_name],
    )
    deployment.storage = ProjectCheckout()
    deployment.entrypoint = ENTRYPOINT
    return deployment
