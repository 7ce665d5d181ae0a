"""Starting the Prefect flows from the `rlhf` command: find them, configure Prefect, run
the pipeline or the retrain once, or serve the retrain deployment on a schedule.

flows/ and tasks/ are not installed packages: they live in the project's repository and are
loaded by path, the way Prefect itself loads a deployment's entrypoint (`load_entrypoint`,
e.g. "flows/retrain.py:retrain"). A path is looked up in the project root first, then beside
this package (an editable install of this repository), so a project that only holds data and
params can still use the flows that came with the code. Prefect is imported inside functions.
`rlhf run`, `retrain` and `serve` first check that the MLflow tracking store answers.

    rlhf run      -> run_pipeline(root)      the pipeline flow, ephemeral Prefect (no server)
    rlhf retrain  -> run_retrain(root)       the retrain flow once
    rlhf serve    -> serve(root, params)     retrain deployments: cron + event trigger
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlhf_core.app.prefect_server import configure_prefect, prefect_server
from rlhf_core.orchestration.store_versioning import INGESTED_EVENT
from rlhf_core.scripts import load_script
from rlhf_core.tracking.check import check_tracking_store

PIPELINE_ENTRYPOINT = "flows/pipeline.py:pipeline"
RETRAIN_ENTRYPOINT = "flows/retrain.py:retrain"
DEPLOYMENTS_ENTRYPOINT = "flows/deployments.py:retrain_deployments"
DVC_STAGE_TASKS = "tasks/dvc_stage.py"
DEFAULT_SCHEDULE_CRON = "0 3 * * *"  # every night at 03:00


def load_entrypoint(entrypoint: str, project_root: str | Path = ".") -> Any:
    """The object named by a Prefect-style entrypoint "path/to/file.py:name" (`load_script`)."""
    script, separator, name = entrypoint.rpartition(":")
    if not separator or not script.endswith(".py") or not name:
        raise ValueError(f"Entrypoint {entrypoint!r} must look like 'path/to/file.py:name'.")
    module = load_script(script, project_root)
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"{module.__file__} defines no {name!r}.") from None


# --------------------------------------------------------------------------------------------
# rlhf run
# --------------------------------------------------------------------------------------------


def run_pipeline(project_root: str | Path = ".") -> dict[str, Any]:
    """Run the pipeline flow once and return its summary.

    Prefect runs in ephemeral mode (a temporary local API, no server to start) unless
    PREFECT_API_URL points at a server, which then records the run. A tracking store that
    cannot be reached raises TrackingStoreError before anything starts.
    """
    root = Path(project_root).resolve()
    check_tracking_store(root)
    configure_prefect(root)
    pipeline = load_entrypoint(PIPELINE_ENTRYPOINT, root)
    # What is stale, before Prefect starts: when anything is, the warm stage server imports
    # the training libraries while Prefect's temporary server starts (both take seconds).
    from rlhf_core.orchestration.warm_stages import warm_stages

    stale = load_script(DVC_STAGE_TASKS, root).stale_stages(root)
    with warm_stages(root) as server:
        if stale:
            server.start()
        return pipeline(project_root=str(root), stale=stale)


def run_retrain(project_root: str | Path = ".") -> dict[str, Any]:
    """Run the retrain flow once (ingest data/incoming, reproduce, gate) and return its result.
    A tracking store that cannot be reached raises TrackingStoreError before anything starts."""
    root = Path(project_root).resolve()
    check_tracking_store(root)
    configure_prefect(root)
    retrain = load_entrypoint(RETRAIN_ENTRYPOINT, root)
    return retrain(project_root=str(root))


def schedule_cron(params: Any) -> str:
    """`orchestration.schedule_cron` of the params, or DEFAULT_SCHEDULE_CRON."""
    section = getattr(params, "orchestration", None)
    cron = getattr(section, "schedule_cron", None)
    return cron or DEFAULT_SCHEDULE_CRON


def serve(project_root: str | Path, params: Any) -> None:
    """Serve the retrain deployments (cron schedule + event trigger, one run at a time) until
    interrupted. Blocking; starts a local Prefect server when PREFECT_API_URL is not set.
    A tracking store that cannot be reached raises TrackingStoreError before anything starts."""
    root = Path(project_root).resolve()
    check_tracking_store(root)
    configure_prefect(root)
    cron = schedule_cron(params)
    with prefect_server(root) as api_url:
        os.environ["PREFECT_API_URL"] = api_url  # for flow-run subprocesses the runner starts
        from prefect import serve as serve_deployments
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            deployments = load_entrypoint(DEPLOYMENTS_ENTRYPOINT, root)(str(root), cron)
            print(
                f"Serving retrain: cron '{cron}', and on event '{INGESTED_EVENT}'. Ctrl-C stops.",
                flush=True,
            )
            serve_deployments(*deployments)


# --------------------------------------------------------------------------------------------
# rlhf deploy
# --------------------------------------------------------------------------------------------

POOL_DEPLOYMENT_ENTRYPOINT = "flows/deployments.py:pool_deployment"


def project_name(project_root: str | Path, params: Any) -> str:
    """`orchestration.project_name`, or the project folder's name."""
    section = getattr(params, "orchestration", None)
    return getattr(section, "project_name", None) or Path(project_root).resolve().name


def deploy_to_pool(project_root: str | Path, params: Any, pool: str) -> str:
    """Create (or update) the retrain deployment on work pool `pool` of the Prefect server
    at PREFECT_API_URL, creating a `process` pool when there is none; its full name.

    Nothing is started here: workers (`prefect worker start --pool POOL` with
    RLHF_PROJECT_ROOT set, or `rlhf infra up`) run its flow runs."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ValueError(
            "PREFECT_API_URL is not set: a work-pool deployment lives on a Prefect server "
            "(`rlhf infra up` starts one, or use your team's); `rlhf serve` needs none"
        )
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)  # the team's pool, kept as it is
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    name = project_name(project_root, params)
    deployment = load_entrypoint(POOL_DEPLOYMENT_ENTRYPOINT, project_root)(
        name, schedule_cron(params)
    )
    deployment.apply(work_pool_name=pool)
    return deployment.full_name
