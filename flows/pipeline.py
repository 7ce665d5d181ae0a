"""The pipeline flow: every DVC stage in DAG order under one MLflow parent run, then the gate.

    stage order (dvc dag) + what is stale (one dvc status) -> parent MLflow run -> run_stage
    per stage (up-to-date stages are skipped; each stage's run nests under the parent) ->
    summary table -> quality gate (register the candidate, head to head against the
    champion, promote or keep)

Anything this flow produced can be rebuilt with `dvc repro` alone; it adds the order, retries,
the parent run, the summary and the gate. Loaded by path (`flows/pipeline.py:pipeline`).
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from rlhf_core.orchestration.warm_stages import warm_stages
from rlhf_core.scripts import load_script
from rlhf_core.tracking.experiment import (
    artifact_location,
    ensure_experiment,
    experiment_name,
    global_tracking_uri,
    tracking_uri,
)
from rlhf_core.tracking.lineage import git_state
from rlhf_core.tracking.orphans import end_orphaned_runs, process_tags

# tasks/ is not a package: load the task module by path, beside this flow's folder.
TASKS = Path(__file__).resolve().parents[1] / "tasks"
dvc_stage = load_script(TASKS / "dvc_stage.py")
gate_task = load_script(TASKS / "quality_gate.py")
run_stage = dvc_stage.run_stage

SUMMARY_ARTIFACT_DIR = "pipeline"
RUN_NUMBER_TAG = "pipeline.number"
DATA_VERSION_TAG = "data_version"
VALIDATED_DATA = "data/validated"  # the validate stage's output, as dvc.yaml names it
NO_PARAM_CHANGE = "no change"
HEADLINE_POLICY_METRICS = ("gold_win_rate_vs_sft", "rm_win_rate_vs_sft", "kl_to_sft")
EVALUATION_METRICS = Path("artifacts") / "metrics" / "evaluate.json"
KEY_METRICS_PER_STAGE = 4

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Summary: pure functions of the stage results and their metric files
# --------------------------------------------------------------------------------------------


def numeric_leaves(metrics: Any, prefix: str = "") -> dict[str, float]:
    """{"dotted.key": value} for every number (not bool) in nested dicts, in file order."""
    leaves: dict[str, float] = {}
    if isinstance(metrics, Mapping):
        for key, value in metrics.items():
            leaves.update(numeric_leaves(value, f"{prefix}{key}."))
    elif isinstance(metrics, int | float) and not isinstance(metrics, bool):
        leaves[prefix.rstrip(".")] = float(metrics)
    return leaves


def key_metrics(
    metric_files: Mapping[str, Any], limit: int = KEY_METRICS_PER_STAGE
) -> dict[str, float]:
    """The first `limit` numbers of a stage's metric files (durations left out: the table
    has its own column); keys are prefixed with the file's name when it has several."""
    chosen: dict[str, float] = {}
    for path, content in metric_files.items():
        prefix = f"{Path(path).stem}." if len(metric_files) > 1 else ""
        for key, value in numeric_leaves(content).items():
            if key.endswith(("seconds", "duration_s")):
                continue
            if len(chosen) == limit:
                return chosen
            chosen[prefix + key] = value
    return chosen


def summary_rows(
    results: list[dict[str, Any]], metrics_by_file: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """One row per stage: stage, status, seconds, version (short md5s), run id, key metrics."""
    rows = []
    for result in results:
        files = {p: metrics_by_file[p] for p in result["outputs"] if p in metrics_by_file}
        versions = [md5[:8] for path, md5 in result["outputs"].items() if path not in files]
        rows.append(
            {
                "stage": result["stage"],
                "status": result["status"],
                "seconds": result["duration_s"],
                "version": ",".join(versions) or "-",
                "run_id": result["run_id"] or "-",
                "metrics": key_metrics(files),
            }
        )
    return rows


def render_table(rows: list[dict[str, Any]], title: str) -> str:
    """The summary rows as a plain-text table (rich), as printed and logged."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("stage", "status", "s", "version", "mlflow run", "key metrics"):
        table.add_column(column)
    for row in rows:
        shown = ", ".join(f"{key}={value:.4g}" for key, value in row["metrics"].items())
        table.add_row(
            row["stage"],
            row["status"],
            f"{row['seconds']:.1f}",
            row["version"],
            row["run_id"][:12],
            shown or "-",
        )
    console = Console(file=io.StringIO(), width=140, record=True)
    console.print(table)
    return console.export_text()


def metrics_patterns(project_root: Path) -> list[re.Pattern[str]]:
    """The metrics files dvc.yaml declares, as patterns (`${...}` of foreach stages matches
    one path segment), so no DVC process is needed to tell metrics from other outputs."""
    stages = (dvc_stage.read_yaml(project_root / "dvc.yaml") or {}).get("stages") or {}
    declared: list[str] = []
    for definition in stages.values():
        body = (definition or {}).get("do", definition) or {}
        for entry in body.get("metrics") or []:
            declared.extend([entry] if isinstance(entry, str) else list(entry))
    return [
        re.compile(
            "".join(
                r"[^/]+" if part.startswith("${") else re.escape(part)
                for part in re.split(r"(\$\{[^}]*\})", path)
            )
            + "$"
        )
        for path in declared
    ]


def dvc_metrics(project_root: Path, results: list[dict[str, Any]]) -> dict[str, Any]:
    """{metrics file: content} for the metrics files among the stages' outputs, read from
    the workspace (what `dvc metrics show` reads); unreadable files are left out."""
    patterns = metrics_patterns(project_root)
    metrics: dict[str, Any] = {}
    for result in results:
        for path in result["outputs"]:
            if not any(pattern.match(path) for pattern in patterns):
                continue
            try:
                metrics[path] = json.loads((project_root / path).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:  # as `dvc metrics show`: skipped
                log.warning("metrics file %s left out of the summary: %s", path, error)
    return metrics


# --------------------------------------------------------------------------------------------
# MLflow: the pipeline's parent run
# --------------------------------------------------------------------------------------------


def _mlflow_key(name: str) -> str:
    # MLflow keys allow letters, digits and `_ - . / space`; foreach stages are `policy@dpo`.
    return name.replace("@", ".")


def headline_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a reviewer compares between pipeline runs, from evaluate.json:
    `reward.eval_accuracy`, and per policy (best-of-n included, SFT left out: it is the
    reference) `<policy>.gold_win_rate_vs_sft`, `.rm_win_rate_vs_sft`, `.kl_to_sft`."""
    metrics: dict[str, float] = {}
    accuracy = (evaluation.get("reward_model") or {}).get("eval_accuracy")
    if isinstance(accuracy, int | float):
        metrics["reward.eval_accuracy"] = float(accuracy)
    for policy, values in evaluation.items():
        if policy in ("sft", "reward_model") or not isinstance(values, Mapping):
            continue
        for key in HEADLINE_POLICY_METRICS:
            if isinstance(values.get(key), int | float):
                metrics[f"{policy}.{key}"] = float(values[key])
    return metrics


def param_changes(
    current: Mapping[str, str], previous: Mapping[str, str] | None, shown: int = 2
) -> str:
    """What changed since the previous pipeline run, for a run name: `first run`,
    `no change`, or `key=value` for up to `shown` changed params (`+N more`)."""
    if previous is None:
        return "first run"
    changed = sorted(
        key for key in set(current) | set(previous) if current.get(key) != previous.get(key)
    )
    if not changed:
        return NO_PARAM_CHANGE
    parts = [f"{key}={current.get(key, '(removed)')}" for key in changed[:shown]]
    if len(changed) > shown:
        parts.append(f"+{len(changed) - shown} more")
    return " ".join(parts)


def pipeline_run_name(
    number: int, data_version: str, previous_data: str | None, changes: str
) -> str:
    """`#3 new data, policy.dpo.beta=0.3 | data 1a2b3c4d`: what tells pipeline runs apart
    comes first (the runs table cuts long names); the data version is the md5 of
    data/validated, what the training stages read."""
    if previous_data is not None and data_version != previous_data:
        changes = "new data" if changes == NO_PARAM_CHANGE else f"new data, {changes}"
    return f"#{number} {changes} | data {data_version[:8]}"


def flat_project_params(project_root: Path) -> dict[str, str]:
    """params.yaml flattened to dotted keys (as logged on the pipeline run); {} without it."""
    from rlhf_core.tracking.runs import flatten_params

    params_file = project_root / "params.yaml"
    if not params_file.is_file():
        return {}
    return flatten_params(dvc_stage.read_yaml(params_file) or {})


def project_params(run_params: Mapping[str, str]) -> dict[str, str]:
    """The params.yaml part of a pipeline run's params (the gate adds `gate.threshold.*`)."""
    return {k: v for k, v in run_params.items() if not k.startswith("gate.threshold.")}


def previous_pipeline_run(client: Any, experiment_id: str) -> Any:
    """The newest finished pipeline run of the experiment, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string="tags.stage = 'pipeline' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def data_version(results: list[dict[str, Any]]) -> str:
    """md5 of data/validated (what the training stages read), as dvc.lock records it among
    the stage results' outputs; "none" in a project without it."""
    for result in results:
        if VALIDATED_DATA in result["outputs"]:
            return result["outputs"][VALIDATED_DATA]
    return "none"


@contextmanager
def parent_run(project_root: Path) -> Iterator[str]:
    """The pipeline's MLflow run, active while the stages run; yields its id.

    Tagged with the Prefect flow run and the git commit, with params.yaml (flattened) as its
    params, so the compare view lines runs up by any knob. It is named while it runs
    `#N (running)`; `name_pipeline_run` gives it its final name. It ends FINISHED,
    or FAILED when the block raises (a stage failed).
    """
    import mlflow
    from mlflow import MlflowClient
    from prefect.runtime import flow_run

    uri = tracking_uri(project_root)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = ensure_experiment(
        client, experiment_name(), artifact_location(project_root, uri)
    )
    end_orphaned_runs(client, experiment_id, "pipeline")  # a pipeline process killed before
    previous = previous_pipeline_run(client, experiment_id)
    number = 1 + int(previous.data.tags.get(RUN_NUMBER_TAG, 0)) if previous else 1
    commit, dirty = git_state(project_root)
    tags = {
        "stage": "pipeline",
        **process_tags(),
        RUN_NUMBER_TAG: str(number),
        "orchestrator": "prefect",
        "prefect.flow_run_id": str(flow_run.id or "none"),
        "prefect.flow_run_name": str(flow_run.name or "none"),
        "git_commit": commit,
        "git_dirty": dirty,
    }
    if previous is not None:
        tags["previous_pipeline_run"] = previous.info.run_id
    with (
        global_tracking_uri(uri),
        mlflow.start_run(
            experiment_id=experiment_id, run_name=f"#{number} (running)", tags=tags
        ) as run,
    ):
        params = flat_project_params(project_root)
        if params:
            from mlflow.entities import Param

            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        yield run.info.run_id


def name_pipeline_run(run_id: str, version: str) -> str:
    """Give the pipeline run its final name (number, data `version`, what changed since the
    previous pipeline run) and tag its data version; returns the name."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    run = client.get_run(run_id)
    previous_id = run.data.tags.get("previous_pipeline_run")
    previous = client.get_run(previous_id) if previous_id else None
    changes = param_changes(
        project_params(run.data.params), project_params(previous.data.params) if previous else None
    )
    previous_data = previous.data.tags.get(DATA_VERSION_TAG) if previous else None
    name = pipeline_run_name(
        int(run.data.tags.get(RUN_NUMBER_TAG, 1)), version, previous_data, changes
    )
    mlflow.set_tags({"mlflow.runName": name, DATA_VERSION_TAG: version, "changes": changes})
    return name


def log_summary(
    rows: list[dict[str, Any]], table: str, seconds: float, headline: Mapping[str, float]
) -> None:
    """Summary table and rows as artifacts of the active (parent) run, per-stage tags, and
    the headline metrics (`headline_metrics`) as the run's own metrics."""
    import mlflow

    mlflow.log_text(table, f"{SUMMARY_ARTIFACT_DIR}/summary.txt")
    mlflow.log_dict({"stages": rows}, f"{SUMMARY_ARTIFACT_DIR}/summary.json")
    tags = {}
    for row in rows:
        key = _mlflow_key(row["stage"])
        tags[f"stage.{key}.status"] = row["status"]
        tags[f"stage.{key}.run_id"] = row["run_id"]
    mlflow.set_tags(tags)
    mlflow.log_metrics(
        {
            **headline,
            "pipeline.seconds": seconds,
            "pipeline.stages_ran": sum(row["status"] == dvc_stage.RAN for row in rows),
        }
    )


# --------------------------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------------------------


def stage_reasons(stage: str, stale: dict[str, list[str]], upstream_ran: list[str]) -> list[str]:
    """Why to reproduce `stage`: DVC's reasons from the start of the run, or the stages that
    ran since (their new outputs may change its inputs; DVC skips it if they did not)."""
    if stage in stale:
        return stale[stage]
    return [f"upstream stage ran: {', '.join(upstream_ran)}"] if upstream_ran else []


def run_stages(
    stages: list[str], root: Path, mlflow_run_id: str, stale: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """run_stage for each stage in order; the first failure stops the rest (and is tagged).

    `stale` is `stale_stages` from before the first stage: an up-to-date stage with nothing
    upstream rerun is skipped without starting DVC.
    """
    import mlflow

    results: list[dict[str, Any]] = []
    for position, stage in enumerate(stages):
        upstream_ran = [r["stage"] for r in results if r["status"] != dvc_stage.SKIPPED]
        reasons = stage_reasons(stage, stale, upstream_ran)
        try:
            results.append(run_stage(stage, str(root), mlflow_run_id, reasons))
        except Exception as error:
            not_run = ", ".join(stages[position + 1 :]) or "none"
            mlflow.set_tag("failed_stage", stage)
            raise RuntimeError(
                f"Stage '{stage}' failed, so the pipeline stopped (not run: {not_run}). {error}"
            ) from error
    return results


def report(results: list[dict[str, Any]], root: Path, mlflow_run_id: str, seconds: float) -> str:
    """Print the summary table and record it in MLflow and as a Prefect table artifact."""
    from prefect.artifacts import create_table_artifact

    metrics = dvc_metrics(root, results)
    rows = summary_rows(results, metrics)
    name = name_pipeline_run(mlflow_run_id, data_version(results))
    table = render_table(rows, title=f"{name} (MLflow run {mlflow_run_id})")
    print(table)
    evaluation = metrics.get(EVALUATION_METRICS.as_posix()) or {}
    log_summary(rows, table, seconds, headline_metrics(evaluation))
    create_table_artifact(
        table=[{**row, "metrics": json.dumps(row["metrics"])} for row in rows],
        key="rlhf-pipeline-summary",
        description=f"Stages of MLflow run {mlflow_run_id}",
    )
    return table


@flow(name="rlhf-pipeline", log_prints=True)
def pipeline(
    project_root: str = ".",
    gate: dict[str, Any] | None = None,
    stale: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Reproduce every stale stage of dvc.yaml in DAG order, then run the quality gate.

    `gate` overrides the gate settings (GateSettings fields); by default they come from
    params.yaml. `stale` is `dvc_stage.stale_stages` when the caller has it already. The
    gate is skipped, with a warning, when there are no evaluation metrics
    (artifacts/metrics/evaluate.json). Returns {"mlflow_run_id", "stages" (each stage's
    run_stage result), "ran" (stages DVC ran or restored), "table", "gate"}. A failing stage
    stops the flow: the MLflow run ends FAILED and the error names the stage and those not run.
    """
    root = Path(project_root).resolve()
    logger = get_run_logger()
    started = time.perf_counter()
    stages = dvc_stage.stage_order(root)
    if stale is None:  # else the caller just asked DVC (`run_pipeline`)
        stale = dvc_stage.stale_stages(root)
    logger.info("stages in DAG order: %s", ", ".join(stages))
    logger.info("stale: %s", ", ".join(stale) or "none")
    # Stale stages run in processes forked from one warm server (imports paid once); it
    # imports while the parent run is created, and stops before the gate.
    with warm_stages(root) as server:
        if stale:
            server.start()
        with parent_run(root) as mlflow_run_id:
            results = run_stages(stages, root, mlflow_run_id, stale)
            server.stop()
            table = report(results, root, mlflow_run_id, time.perf_counter() - started)
            if (root / EVALUATION_METRICS).is_file():
                decision = gate_task.quality_gate(str(root), gate_task.gate_settings(root, gate))
            else:
                reason = f"no {EVALUATION_METRICS} (no evaluate stage output) to gate"
                logger.warning("gate skipped: %s", reason)
                decision = {"status": "skipped", "promote": False, "reasons": [reason]}
            gate_task.log_gate_outcome(decision)
    return {
        "mlflow_run_id": mlflow_run_id,
        "stages": results,
        "ran": [result["stage"] for result in results if result["status"] != dvc_stage.SKIPPED],
        "table": table,
        "gate": decision,
    }
