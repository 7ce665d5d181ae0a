"""The tracking store and the project's experiment: where every MLflow run of the project goes.

The store is the project's own `sqlite:///<root>/mlflow.db` with artifacts under
`<root>/mlruns`, unless `MLFLOW_TRACKING_URI` names another; the experiment is `rlhf`, unless
`RLHF_EXPERIMENT` names another. Stage runs (`tracking.runs`), the pipeline run, the registry
and the store's health check all find the store here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

EXPERIMENT_NAME = "rlhf"
EXPERIMENT_ENV = "RLHF_EXPERIMENT"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# The MLflow UI (3.x) reads this experiment tag to choose between its GenAI view (traces,
# judges) and its model-training view (runs table with metrics, charts); values are in its
# front end (`mlflow/server/js`): genai_development, custom_model_development, ...
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# Remote stores choose their own artifact root; only these schemes get one in the project.
_SERVER_SCHEMES = ("http://", "https://", "databricks")


def tracking_uri(project_root: Path = Path(".")) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the project's store `sqlite:///<abs root>/mlflow.db`."""
    from_env = os.environ.get(TRACKING_URI_ENV)
    if from_env:
        return from_env
    return f"sqlite:///{Path(project_root).resolve() / 'mlflow.db'}"


def experiment_name() -> str:
    """The project's one experiment: `RLHF_EXPERIMENT` if set, else `EXPERIMENT_NAME`."""
    return os.environ.get(EXPERIMENT_ENV) or EXPERIMENT_NAME


def artifact_location(project_root: Path, uri: str) -> str | None:
    """Absolute file URI `<root>/mlruns` for a local store; None lets a server choose."""
    if uri.startswith(_SERVER_SCHEMES):
        return None
    return (Path(project_root).resolve() / "mlruns").as_uri()


def ensure_experiment(client: MlflowClient, name: str, location: str | None) -> str:
    """Id of experiment `name`, created with artifact root `location` if it does not exist,
    and marked as model training (EXPERIMENT_KIND_TAG), so the MLflow UI opens it in its
    runs table with metric columns and charts rather than in its GenAI view."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
            )
        except MlflowException:
            # Another stage process created it between our lookup and create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment '{name}' is deleted: restore it (`mlflow experiments restore`) "
            f"or choose another name with {EXPERIMENT_ENV}."
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before this tag existed, or by hand
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


@contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at `uri`, then restore what was there (URI and env var).

    For MLflow calls that read the process-wide URI instead of a client's: `mlflow.start_run`
    and friends, and the registry resolving a `models:/<model id>` source.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous_uri = getattr(tracking_utils, "_tracking_uri", None)
    previous_env = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)  # this also writes (or unsets) the env var ...
        if previous_env is None:  # ... which we put back exactly as it was
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = previous_env
