"""The model registry: candidate and champion versions of the policy and the reward model.

After the evaluate stage, the retraining flow registers the new policy and reward model as
versions of `rlhf-policy` and `rlhf-reward` with the alias `candidate`, asks the quality gate
(`rlhf_core.gate`), and on success moves the alias `champion` to them:

    client = registry_client(project_root)
    candidate = register_candidate(project_root, "dpo", evaluation, decision)
    log_decision(decision, candidate, client)  # inside the pipeline's MLflow run
    if decision.promote:
        promote(client, candidate)

Each version is registered from the MLflow model its stage logged (`StageRun.log_model_dir`,
a pyfunc around the `save_pretrained` folder), found through the run that produced the
model's folder, so `mlflow.pyfunc.load_model("models:/rlhf-policy@champion")` and
`mlflow models serve` work on it. A version carries only the tags a reviewer reads
(`version_tags`): stage, git commit, data version, model md5, headline metrics, and later
the gate's result and promotion. Its full lineage is a JSON artifact of the producing run
(`tracking.registry_lineage`). MLflow is imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.gate import REWARD_MODEL_KEY, GateDecision
from rlhf_core.paths import ProjectPaths
from rlhf_core.tracking.experiment import global_tracking_uri, tracking_uri
from rlhf_core.tracking.lineage import UNKNOWN, read_producer_run_id
from rlhf_core.tracking.registry_lineage import (
    LINEAGE_FOLDER,
    LINEAGE_TAG,
    MODEL_ARTIFACT,
    data_version,
    lineage_chain,
    lineage_record,
    tag_key,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

POLICY_MODEL = "rlhf-policy"
REWARD_MODEL = "rlhf-reward"
CANDIDATE = "candidate"
CHAMPION = "champion"
GATE_ARTIFACT = "gate.json"
# The metrics a reviewer compares versions by; they become version tags of the same name.
HEADLINE_METRICS = {
    POLICY_MODEL: ("gold_win_rate_vs_sft", "rm_win_rate_vs_sft", "kl_to_sft"),
    REWARD_MODEL: ("eval_accuracy",),
}
# Tags the gate and promotion add after registration; registering again keeps them.
DECISION_TAGS = ("gate", "gate.run_id", "promoted_at", "previous_champion")

_MAX_TAG_VALUE = 5000  # well inside MLflow's limits for run tags and model version tags


@dataclass(frozen=True)
class RegisteredCandidate:
    """The registered versions of one candidate: the policy and the reward model beside it."""

    policy_version: str
    reward_version: str
    policy_name: str = ""  # the algorithm that trained the policy ("dpo", "ppo", ...)


def registry_client(project_root: Path = Path(".")) -> MlflowClient:
    """An MlflowClient on the project's store (`experiment.tracking_uri`), registry included."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(project_root))


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def register_candidate(
    project_root: Path,
    policy_name: str,
    evaluation: Mapping[str, Mapping[str, Any]],
    decision: GateDecision | None = None,
    client: MlflowClient | None = None,
) -> RegisteredCandidate:
    """Register `artifacts/policy/<policy_name>` and `artifacts/reward` with alias `candidate`.

    Each model is registered from the MLflow model logged by the run that produced its
    directory; a run already registered under that model name reuses its version. Both
    versions get the tags of `version_tags`, a lineage file (`version_lineage`) and a
    description; with a `decision`, also the tag `gate=passed|failed`.

    Args:
        project_root: the project whose `artifacts/` hold the models.
        policy_name: the algorithm of the candidate policy ("dpo", "ppo", ...).
        evaluation: the evaluate stage's metrics (`artifacts/metrics/evaluate.json`).
        decision: the gate's decision about this candidate, when already made.
        client: the registry to use; `registry_client(project_root)` by default.
    """
    root = Path(project_root)
    paths = ProjectPaths(root)
    if policy_name not in evaluation:
        raise ValueError(
            f"The evaluation has no metrics for policy '{policy_name}'; run the evaluate stage "
            "after the policy stage before registering it."
        )
    _require_same_candidate(decision, policy_name)
    client = client or registry_client(root)
    policy_run = _producer_run(client, paths.policy_dir(policy_name))
    reward_run = _producer_run(client, paths.reward_model_dir)
    policy_metrics = evaluation[policy_name]
    reward_metrics = evaluation.get(REWARD_MODEL_KEY) or {}
    gate_text = "" if decision is None else f" Gate: {_gate_result(decision)}."
    policy_version = _register_run_model(
        client,
        POLICY_MODEL,
        policy_run,
        root,
        metrics=policy_metrics,
        lineage_extra={"policy_name": policy_name, "reward_run_id": reward_run.info.run_id},
        description=_describe(f"{policy_name} policy", policy_run, policy_metrics) + gate_text,
    )
    reward_version = _register_run_model(
        client,
        REWARD_MODEL,
        reward_run,
        root,
        metrics=reward_metrics,
        lineage_extra={"candidate_policy": policy_name},
        description=_describe("Reward model", reward_run, reward_metrics) + gate_text,
    )
    candidate = RegisteredCandidate(policy_version, reward_version, policy_name)
    for name, version in _versions_of(candidate):
        client.set_registered_model_alias(name, CANDIDATE, version)
    if decision is not None:
        _tag_gate(client, candidate, decision)
    log.info(
        "Registered candidate %s: %s v%s, %s v%s.",
        policy_name,
        POLICY_MODEL,
        policy_version,
        REWARD_MODEL,
        reward_version,
    )
    return candidate


def version_tags(
    name: str,
    run: Run,
    chain: list[dict[str, Any]],
    project_root: Path,
    metrics: Mapping[str, Any],
) -> dict[str, str]:
    """The tags a reviewer reads on a version of `name` registered from `run`.

    `stage` (the producing stage; a policy's algorithm), `git_commit`, `data_version` (the
    DVC md5 of the data set the run read, e.g. data/validated/preference; `name=md5` pairs
    when it read several), `model_md5` (the model directory's DVC md5) and the model's
    `HEADLINE_METRICS` that are not null. The gate and promotion add `DECISION_TAGS`, and
    registration the `lineage` tag: at most a dozen in all. Everything else is in the
    version's lineage file (`version_lineage`).
    """
    run_tags = run.data.tags
    tags = {
        "stage": run_tags.get("stage", run.info.run_name or UNKNOWN),
        "git_commit": run_tags.get("git_commit", UNKNOWN),
        "data_version": data_version(chain[0]["inputs"] if chain else {}, project_root),
    }
    model_md5 = run_tags.get(f"model.{MODEL_ARTIFACT}.md5")
    if model_md5:
        tags["model_md5"] = model_md5
    for key in HEADLINE_METRICS.get(name, ()):
        if metrics.get(key) is not None:
            tags[key] = _tag_value(metrics[key])
    return tags


def _producer_run(client: MlflowClient, directory: Path) -> Run:
    """The run that produced `directory` (its run marker), which must be in the store."""
    from mlflow.exceptions import MlflowException

    run_id = read_producer_run_id(directory)
    if run_id is None:
        raise ValueError(
            f"No run is known to have produced {directory}: its stage did not finish under "
            "MLflow tracking; rerun it with `rlhf stage` (or `dvc repro`) before registering."
        )
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        raise ValueError(
            f"Run {run_id}, which produced {directory}, is not in the tracking store "
            f"{client.tracking_uri}; point MLFLOW_TRACKING_URI at the store the stage used."
        ) from error


def _logged_model_id(client: MlflowClient, run: Run) -> str:
    """The id of the MLflow model `MODEL_ARTIFACT` that `run` logged (`log_model_dir`)."""
    from mlflow.exceptions import MlflowException

    stage = run.data.tags.get("stage", "unknown stage")
    model_id = run.data.tags.get(f"model.{MODEL_ARTIFACT}.model_id")
    if model_id is None:
        raise ValueError(
            f"Run {run.info.run_id} ({stage}) logged no MLflow model '{MODEL_ARTIFACT}': its "
            f"stage must call log_model_dir(out_dir, '{MODEL_ARTIFACT}'); a run from before "
            "models were logged that way needs its stage rerun (`dvc repro --force <stage>`)."
        )
    try:
        client.get_logged_model(model_id)
    except MlflowException as error:
        raise ValueError(
            f"Run {run.info.run_id} ({stage}) names the logged model {model_id}, which is not "
            f"in the tracking store {client.tracking_uri}."
        ) from error
    return model_id


def _register_run_model(
    client: MlflowClient,
    name: str,
    run: Run,
    project_root: Path,
    *,
    metrics: Mapping[str, Any],
    lineage_extra: Mapping[str, Any],
    description: str,
) -> str:
    """Version (as a string) of `name` registered from the run's logged model, tagged."""
    run_id = run.info.run_id
    model_id = _logged_model_id(client, run)
    _ensure_registered_model(client, name)
    chain = lineage_chain(client, run_id)
    tags = version_tags(name, run, chain, project_root, metrics)
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        # The same run registered again (nothing upstream changed): one version per run.
        found = max(existing, key=lambda found: int(found.version))
        version = str(found.version)
        client.update_model_version(name, version, description=description)
        _replace_version_tags(client, found, tags)
    else:
        # A `models:/<model id>` source links the version to its logged model in the UI; the
        # local store resolves it through the process-wide tracking URI, so point that here.
        with global_tracking_uri(client.tracking_uri):
            created = client.create_model_version(
                name,
                source=f"models:/{model_id}",
                run_id=run_id,
                tags=tags,
                description=description,
                model_id=model_id,
            )
        version = str(created.version)
    record = lineage_record(name, version, run, chain, project_root, metrics, lineage_extra)
    lineage_file = f"{LINEAGE_FOLDER}/{name}-v{version}.json"
    client.log_dict(run_id, record, lineage_file)
    client.set_model_version_tag(name, version, LINEAGE_TAG, f"runs:/{run_id}/{lineage_file}")
    return version


def _replace_version_tags(
    client: MlflowClient, version: ModelVersion, tags: Mapping[str, str]
) -> None:
    """Set `tags` on `version` and drop headline metrics that are no longer known; the gate's,
    the promotion's and people's own tags stay."""
    for key in HEADLINE_METRICS.get(version.name, ()):
        if key in version.tags and key not in tags:
            client.delete_model_version_tag(version.name, version.version, key)
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":  # made meanwhile by another flow
            raise


def _describe(what: str, run: Run, metrics: Mapping[str, Any]) -> str:
    commit = run.data.tags.get("git_commit", UNKNOWN)
    shown = ", ".join(
        f"{key} {value:.3g}"
        for key, value in metrics.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and not key.endswith(("_ci_low", "_ci_high"))
    )
    text = f"{what} from stage run {run.info.run_id} at git commit {commit[:12]}."
    return f"{text} Metrics: {shown}." if shown else text


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_TAG_VALUE]


# --------------------------------------------------------------------------------------------
# Champion
# --------------------------------------------------------------------------------------------


def current_champion(client: MlflowClient, name: str = POLICY_MODEL) -> ModelVersion | None:
    """The version of `name` with alias `champion`, or None when the model or alias is absent."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = (model.aliases or {}).get(CHAMPION)
    return None if version is None else client.get_model_version(name, str(version))


def promote(client: MlflowClient, candidate: RegisteredCandidate) -> None:
    """Move alias `champion` to the candidate's policy and reward versions.

    Each promoted version is tagged `promoted_at` (UTC, ISO 8601) and, when it replaces
    another version, `previous_champion` (that version, for a rollback).
    """
    promoted_at = datetime.now(UTC).isoformat(timespec="seconds")
    for name, version in _versions_of(candidate):
        previous = current_champion(client, name)
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(name, version, "promoted_at", promoted_at)
        if previous is not None and str(previous.version) != version:
            client.set_model_version_tag(name, version, "previous_champion", str(previous.version))
        log.info("%s v%s is the champion now.", name, version)


def download_model_dir(
    client: MlflowClient, version: ModelVersion, destination: Path | None = None
) -> Path:
    """Download a model version's `save_pretrained` directory and return its local path.

    The directory is the one the version's MLflow model wraps (its `artifacts/` folder);
    only that folder is downloaded. A version registered from plain artifacts (before models
    were logged as MLflow models) is the directory itself. Into `destination` when given,
    else a new temporary directory the caller owns.
    """
    from mlflow.artifacts import download_artifacts

    target = Path(destination) if destination is not None else None
    if target is None:
        target = Path(tempfile.mkdtemp(prefix=f"{version.name}-v{version.version}-"))
    target.mkdir(parents=True, exist_ok=True)
    source = client.get_model_version_download_uri(version.name, version.version).rstrip("/")
    inside = _pretrained_path_in(source, client.tracking_uri)
    local = Path(
        download_artifacts(
            artifact_uri=f"{source}/{inside}" if inside else source,
            dst_path=str(target),
            tracking_uri=client.tracking_uri,
        )
    )
    if not (local / "config.json").is_file():
        raise ValueError(
            f"{version.name} v{version.version} ({source}) is not a save_pretrained model "
            "directory: it has no config.json."
        )
    return local


def _pretrained_path_in(source: str, tracking: str) -> str | None:
    """Where the save_pretrained folder sits inside the model at `source`; None without MLmodel."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from rlhf_core.tracking.models import pretrained_path

    with tempfile.TemporaryDirectory(prefix="mlmodel-") as scratch:
        try:
            mlmodel = download_artifacts(
                artifact_uri=f"{source}/MLmodel", dst_path=scratch, tracking_uri=tracking
            )
        except (MlflowException, OSError):
            return None
        return pretrained_path(Model.load(mlmodel))


# --------------------------------------------------------------------------------------------
# Gate decision
# --------------------------------------------------------------------------------------------


def log_decision(
    decision: GateDecision,
    candidate: RegisteredCandidate | None,
    client: MlflowClient | None = None,
) -> None:
    """Record the gate's decision in the active MLflow run and on the candidate's versions.

    The run gets tags `gate.result` (passed|failed), `gate.promote`, `gate.candidate` and
    `gate.reasons`, a param `gate.threshold.<check>` and a metric `gate.<check>` per check,
    and the artifact `gate.json` (`GateDecision.as_dict()`). The candidate's versions, when
    given, get tags `gate` (passed|failed) and `gate.run_id`. `client` defaults to one on
    the active run's tracking URI.
    """
    import mlflow

    run = mlflow.active_run()
    if candidate is not None:
        _require_same_candidate(decision, candidate.policy_name)
    if run is None:
        raise ValueError(
            "log_decision needs an active MLflow run (the pipeline run); call it inside "
            "mlflow.start_run()."
        )
    mlflow.set_tags(
        {
            "gate.result": _gate_result(decision),
            "gate.promote": str(decision.promote).lower(),
            "gate.candidate": decision.candidate or "none",
            "gate.reasons": "\n".join(decision.reasons)[:_MAX_TAG_VALUE],
        }
    )
    checks = {tag_key(name): check for name, check in decision.checks.items()}
    mlflow.log_params({f"gate.threshold.{name}": c["threshold"] for name, c in checks.items()})
    values = {f"gate.{name}": c["value"] for name, c in checks.items() if c["value"] is not None}
    if values:
        mlflow.log_metrics(values)
    mlflow.log_dict(decision.as_dict(), GATE_ARTIFACT)
    if candidate is not None:
        client = client or _client_of_active_run()
        _tag_gate(client, candidate, decision, run.info.run_id)


def _client_of_active_run() -> MlflowClient:
    import mlflow
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow.get_tracking_uri())


def _tag_gate(
    client: MlflowClient,
    candidate: RegisteredCandidate,
    decision: GateDecision,
    run_id: str | None = None,
) -> None:
    for name, version in _versions_of(candidate):
        client.set_model_version_tag(name, version, "gate", _gate_result(decision))
        if run_id is not None:
            client.set_model_version_tag(name, version, "gate.run_id", run_id)


def _require_same_candidate(decision: GateDecision | None, policy_name: str) -> None:
    if decision is None or not policy_name or decision.candidate in (None, policy_name):
        return
    raise ValueError(
        f"The gate decided about candidate '{decision.candidate}', not '{policy_name}'; "
        "register and log the policy the gate selected."
    )


def _gate_result(decision: GateDecision) -> str:
    return "passed" if decision.promote else "failed"


def _versions_of(candidate: RegisteredCandidate) -> tuple[tuple[str, str], ...]:
    return ((POLICY_MODEL, candidate.policy_version), (REWARD_MODEL, candidate.reward_version))
