"""MLflow tracking: one MLflow run per pipeline stage.

Every stage process opens its run through `stage_run`. The run carries the stage's params
(flattened to dotted keys), the git commit, the md5 of each input (the same value DVC writes
to dvc.lock) and the id of the run that produced each input (`tracking.lineage`). Lineage
never depends on an orchestrator: at a successful exit the run writes a marker beside each
output it recorded, for the next stage, a separate process, to find the producing run.

    with stage_run("sft", params=params.model_dump(), inputs={"train": sft_path}) as run:
        for step, loss in enumerate(losses):
            run.log_metrics({"train/loss": loss}, step=step)
        run.record_output(model_dir)

The run goes to the project's store and experiment (`tracking.experiment`). When the
orchestrator sets `MLFLOW_PARENT_RUN_ID`, the stage's run is nested under that pipeline run.

A store that stops answering never stops or stalls the stage: metrics are sent by a
background thread (`tracking.metric_writer`) and wait in the run's spool (`tracking.spool`)
while it is down; other calls look at the store first (a few seconds at most) and, once it
does not answer, are skipped (tags are kept for later, artifacts and the model named in one
warning). The stage ends normally, its outputs and markers written; its run is ended, with
the tag `rlhf.tracking.outage`, by the next stage start that finds the store answering.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.tracking.check import TrackingStoreError, check_store_uri, mask_uri
from rlhf_core.tracking.experiment import (
    artifact_location,
    ensure_experiment,
    experiment_name,
    global_tracking_uri,
    tracking_uri,
)
from rlhf_core.tracking.lineage import git_state, lineage_tags, path_md5, write_run_marker
from rlhf_core.tracking.metric_writer import MetricWriter, batch_sender
from rlhf_core.tracking.orphans import end_orphaned_runs, process_tags
from rlhf_core.tracking.spool import Spool, is_unreachable, replay_spools
from rlhf_core.tracking.timing import counts_as_tracking, tracking_time

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "MLFLOW_PARENT_RUN_ID"

# The metric writer sends after this many `log_metrics` calls or this many seconds,
# whichever comes first, and always at the end of the run, waiting at most
# RLHF_TRACKING_FLUSH_TIMEOUT_S seconds there.
FLUSH_EVERY_CALLS = 50
FLUSH_EVERY_SECONDS = 30.0
FLUSH_TIMEOUT_ENV = "RLHF_TRACKING_FLUSH_TIMEOUT_S"
DEFAULT_FLUSH_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 2.0  # a look at the store before a call that would wait minutes on it
_SKIPPED = object()  # what `_store_call` returns when the store did not answer
_DATASET_READERS = {".parquet": "parquet", ".jsonl": "jsonl", ".csv": "csv"}


# What MLflow accepts in a param name (mlflow.utils.validation).
_PARAM_NAME = re.compile(r"^[/\w.\- :]*$")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"dotted.key": "value"}; lists and tuples as JSON, the rest as str.

    An empty mapping is kept as "{}" so that its key still shows up in the run. A mapping
    whose keys MLflow would refuse in a param name (free text such as the sanity prompts'
    questions: "?", quotes, ...) is kept whole as JSON under its own key.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and all(_PARAM_NAME.match(str(k)) for k in value):
            flat.update(flatten_params(value, prefix=f"{dotted}."))
        elif isinstance(value, Mapping):
            flat[dotted] = json.dumps(value, default=str, ensure_ascii=False) if value else "{}"
        elif isinstance(value, list | tuple):
            flat[dotted] = json.dumps(value, default=str)
        else:
            flat[dotted] = str(value)
    return flat


class StageRun:
    """The MLflow run of one stage: metrics written in the background, artifacts, datasets
    and outputs; a store that stops answering never stops the stage (module docstring)."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        project_root: Path,
        *,
        uri: str | None = None,
        stage: str = "",
    ) -> None:
        self._client = client
        self._run_id = run_id
        self._project_root = Path(project_root)
        self._uri = uri or client.tracking_uri
        self._outputs: dict[str, Path] = {}
        self._spool = Spool.for_run(self._project_root, run_id, stage, self._uri)
        self._writer = MetricWriter(
            batch_sender(client, self._uri),
            run_id,
            self._spool,
            self._uri,
            every_calls=FLUSH_EVERY_CALLS,
            every_s=FLUSH_EVERY_SECONDS,
        )
        self._offline_reason = ""  # set once the store stopped answering a call
        self._late_tags: dict[str, str] = {}  # tags to send when it answers again
        self._not_logged: list[str] = []  # what was left out while it did not

    @property
    def run_id(self) -> str:
        """The MLflow run id."""
        return self._run_id

    @property
    def offline(self) -> bool:
        """Whether the store stopped answering: calls are skipped, what can wait is spooled."""
        return bool(self._offline_reason)

    @property
    def spool_path(self) -> Path:
        """Where metrics, tags and the end status wait while the store does not answer."""
        return self._spool.path

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue one step's metrics; a background thread writes them (never blocks)."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._writer.put(
            [
                Metric(key=key, value=float(value), timestamp=timestamp, step=int(step))
                for key, value in metrics.items()
            ]
        )

    @counts_as_tracking
    def flush(self, timeout_s: float | None = None) -> bool:
        """Write queued metrics now, waiting at most `timeout_s` (default: the final flush's,
        `RLHF_TRACKING_FLUSH_TIMEOUT_S`); True when all reached the store."""
        return self._writer.flush(final_flush_timeout_s() if timeout_s is None else timeout_s)

    @counts_as_tracking
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a nested mapping of params under dotted keys (<= 100 per store call)."""
        from mlflow.entities import Param

        flat = flatten_params(params)
        self._store_call(
            "params",
            lambda: self._client.log_batch(
                self._run_id, params=[Param(k, v) for k, v in flat.items()]
            ),
        )

    @counts_as_tracking
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags, values as strings (<= 100 per store call); kept for later while the
        store does not answer."""
        from mlflow.entities import RunTag

        values = {key: str(value) for key, value in tags.items()}
        sent = self._store_call(
            "tags",
            lambda: self._client.log_batch(
                self._run_id, tags=[RunTag(k, v) for k, v in values.items()]
            ),
            keep=False,
        )
        if sent is _SKIPPED:
            self._late_tags.update(values)

    @counts_as_tracking
    def log_figure(self, figure: Any, artifact_path: str) -> None:
        """Save a matplotlib or plotly figure as the artifact file `artifact_path`."""
        self._store_call(
            artifact_path, lambda: self._client.log_figure(self._run_id, figure, artifact_path)
        )

    @counts_as_tracking
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy one local file into the run's artifacts (under `artifact_path` if given)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Cannot log artifact {path}: no such file.")
        self._store_call(
            f"{artifact_path}/{path.name}" if artifact_path else path.name,
            lambda: self._client.log_artifact(self._run_id, str(path), artifact_path),
        )

    @counts_as_tracking
    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        """Copy a local directory's contents into the run's artifacts under `artifact_path`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"Cannot log artifacts from {directory}: no such directory.")
        self._store_call(
            artifact_path or directory.name,
            lambda: self._client.log_artifacts(self._run_id, str(directory), artifact_path),
        )

    @counts_as_tracking
    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Write a JSON/YAML-serialisable object as `artifact_file` (format from its suffix)."""
        self._store_call(
            artifact_file, lambda: self._client.log_dict(self._run_id, obj, artifact_file)
        )

    def _store_call(self, what: str, call: Callable[[], Any], keep: bool = True) -> Any:
        """Make one store call unless the store does not answer; then skip it (`what` is
        listed as not logged when `keep`) and return _SKIPPED. The first such call logs one
        warning; later ones are skipped at once instead of waiting on the client's retries."""
        if not self.offline and not self._store_answers():
            self._go_offline(f"no answer at {what}")
        if not self.offline:
            try:
                return call()
            except Exception as error:
                if not is_unreachable(error):
                    raise
                self._go_offline(f"{what}: {str(error).splitlines()[0][:200]}")
        if keep:
            self._not_logged.append(what)
        return _SKIPPED

    def _store_answers(self) -> bool:
        """A quick look at the store (`check_store_uri`, seconds at most)."""
        try:
            check_store_uri(self._uri, self._project_root, PROBE_TIMEOUT_S)
        except TrackingStoreError:
            return False
        return True

    def _go_offline(self, reason: str) -> None:
        if not self.offline:
            self._offline_reason = reason
            log.warning(
                "MLflow tracking store %s does not answer (%s); the stage goes on without it, "
                "what it logs waits in %s.",
                mask_uri(self._uri),
                reason,
                self._spool.path,
            )

    def _close(self, status: str) -> bool:
        """Send the last metrics (bounded: `RLHF_TRACKING_FLUSH_TIMEOUT_S`) and end the run
        with `status`. When the store does not answer, the metrics, late tags and the status
        go to the spool for the next stage start, with one warning; returns whether the run
        reached the store whole."""
        timeout_s = final_flush_timeout_s()
        if not self.offline and not self._writer.close(timeout_s):
            self._go_offline(f"the last metrics not sent within {timeout_s:g} s")
        elif self.offline:
            self._writer.close(0.0)
        if not self.offline and not self._store_answers():
            self._go_offline("no answer at the end of the run")
        if not self.offline:
            try:
                _end_run(self._client, self._run_id, status)
                return True
            except Exception as error:
                if not is_unreachable(error):
                    raise
                self._go_offline(f"ending the run: {str(error).splitlines()[0][:200]}")
        if self._late_tags:
            self._spool.append_tags(self._late_tags)
        if self._not_logged:
            self._spool.append_not_logged(self._not_logged)
        self._spool.append_end(status)
        _end_run_offline(self._client, self._run_id, status)
        left_out = f"; not logged: {', '.join(self._not_logged)}" if self._not_logged else ""
        log.warning(
            "MLflow run %s not ended on %s (%s): the stage's outputs are written; its metrics, "
            "tags and end status %s wait in %s and are sent by the next stage start%s.",
            self._run_id,
            mask_uri(self._uri),
            self._offline_reason,
            status,
            self._spool.path,
            left_out,
        )
        return False

    @counts_as_tracking
    def log_model_dir(self, model_dir: Path, artifact_path: str) -> str | None:
        """Log a `save_pretrained` directory as the MLflow model `artifact_path`; its model id
        (None when the store did not answer and the model was not logged).

        The model is a pyfunc wrapping a copy of the directory (`tracking.models`),
        so `mlflow.pyfunc.load_model` and `mlflow models serve` work on it and on every
        registry version made from it. Tags `model.<artifact_path>.md5` (the directory's
        DVC md5) and `model.<artifact_path>.model_id` (the logged model, `m-...`).
        """
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{model_dir} is not a save_pretrained model directory.")
        model_id = self._store_call(
            f"{artifact_path} (model)", lambda: self._log_pyfunc_model(model_dir, artifact_path)
        )
        if model_id is _SKIPPED:
            return None
        self.set_tags(
            {
                f"model.{artifact_path}.md5": path_md5(model_dir),
                f"model.{artifact_path}.model_id": model_id,
            }
        )
        return model_id

    def _log_pyfunc_model(self, model_dir: Path, name: str) -> str:
        import mlflow

        from rlhf_core.tracking.models import log_pretrained_model

        active = mlflow.active_run()
        if active is None or active.info.run_id != self._run_id:
            raise ValueError(
                f"log_model_dir logs into the active MLflow run, which is not this stage's run "
                f"{self._run_id}; end the run the stage opened inside stage_run first."
            )
        with warnings.catch_warnings():
            # transformers 5.2x is newer than the versions MLflow 3.17 lists as tested.
            warnings.filterwarnings("ignore", module=r"mlflow\.")
            return log_pretrained_model(model_dir, name).model_id

    @counts_as_tracking
    def log_dataset(
        self,
        frame_or_path: pd.DataFrame | Path,
        name: str,
        context: str = "training",
        source: Path | None = None,
    ) -> None:
        """Record a data set as a run input named `<name>@<md5[:12]>` in `context`.

        `source` is the file the frame came from (defaults to the path given); its md5 (the
        value in dvc.lock) goes into the name and the tags. MLflow adds its own sample digest.
        """
        import mlflow
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        if source is None:
            if not isinstance(frame_or_path, str | os.PathLike):
                raise ValueError(
                    f"Data set '{name}' is a frame: pass source= the file it came from."
                )
            source = Path(frame_or_path)
        source = Path(source).resolve()
        if not source.exists():
            raise ValueError(f"Source of data set '{name}' does not exist: {source}.")
        frame = frame_or_path
        if isinstance(frame_or_path, str | os.PathLike):
            frame = _read_frame(Path(frame_or_path))
        md5 = path_md5(source)
        with warnings.catch_warnings():
            # MLflow 3.17 nags here on every call: its local source is registered twice
            # ("interpreted in multiple ways"), schema inference hints about integer
            # columns, and it calls a pandas method positionally, which pandas 3 deprecates.
            warnings.filterwarnings("ignore", module=r"mlflow\.")
            dataset = mlflow.data.from_pandas(frame, source=str(source), name=f"{name}@{md5[:12]}")
            entity = dataset._to_mlflow_entity()
        input_tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("md5", md5)]
        self._store_call(
            f"dataset {name}",
            lambda: self._client.log_inputs(
                self._run_id, datasets=[DatasetInput(entity, input_tags)]
            ),
        )
        self.set_tags({f"dataset.{name}.md5": md5})

    @counts_as_tracking
    def record_output(self, path: Path, name: str | None = None) -> None:
        """Declare an output: at a successful exit its md5 becomes tag `output.<name>.md5`
        and its run marker is written beside it for the next stage to read.

        `name` defaults to the path relative to the project root.
        """
        path = Path(path)
        if name is None:
            name = _relative_name(path, self._project_root)
        self._outputs[name] = path

    def _finish_outputs(self, run_info: dict[str, str]) -> None:
        tags = {}
        for name, path in self._outputs.items():
            if not path.exists():
                raise ValueError(f"Output '{name}' was recorded but never written: {path}.")
            tags[f"output.{name}.path"] = str(path)
            tags[f"output.{name}.md5"] = write_run_marker(path, {**run_info, "output": name})
        self.set_tags(tags)


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def _read_frame(path: Path) -> pd.DataFrame:
    import pandas as pd

    kind = _DATASET_READERS.get(path.suffix.lower())
    if kind is None or not path.is_file():
        readable = ", ".join(_DATASET_READERS)
        raise ValueError(f"Cannot read data set {path}: expected a {readable} file.")
    if kind == "parquet":
        return pd.read_parquet(path)
    if kind == "jsonl":
        return pd.read_json(path, lines=True)
    return pd.read_csv(path)


def _quiet_mlflow() -> None:
    # No "View run at <url>" lines on stdout, and no telemetry: the pipeline stays offline.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _parent_run_id(client: MlflowClient, uri: str) -> str | None:
    from mlflow.exceptions import MlflowException

    parent = os.environ.get(PARENT_RUN_ENV)
    if not parent:
        return None
    try:
        client.get_run(parent)
    except MlflowException as error:
        raise ValueError(f"{PARENT_RUN_ENV}={parent} is not a run in {uri}.") from error
    return parent


def _end_run(client: MlflowClient, run_id: str, status: str) -> None:
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status=status)
    else:  # code inside the stage left its own run open above ours
        client.set_terminated(run_id, status=status)


@contextmanager
def stage_run(
    stage_name: str,
    *,
    project_root: Path = Path("."),
    params: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Path] | None = None,
    tags: Mapping[str, Any] | None = None,
    label: str | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage, with params, lineage tags and output markers.

    The run is named `stage_name`, followed by `label` when given (the stage's key params,
    e.g. "dpo sigmoid beta=0.1", so a runs table reads well); its tag `stage` is
    `stage_name`. It lives in the project's experiment, and is nested under
    `MLFLOW_PARENT_RUN_ID` when that is set (else under an active run, if any). On success
    buffered metrics are flushed, outputs are marked and hashed, and the run ends FINISHED;
    on an exception it ends FAILED (KILLED for Ctrl-C) and the exception propagates. Runs of
    this stage left RUNNING by a process that died are ended first (`orphans`).
    """
    with ExitStack() as stack:
        with tracking_time():  # MLflow set-up is tracking time, not the stage's compute
            _quiet_mlflow()
            import mlflow
            from mlflow import MlflowClient

            root = Path(project_root)
            uri = tracking_uri(root)
            client = MlflowClient(tracking_uri=uri)
            experiment_id = ensure_experiment(
                client, experiment_name(), artifact_location(root, uri)
            )
            replay_spools(client, root, uri)  # before orphans: a spooled run ends as recorded
            end_orphaned_runs(client, experiment_id, stage_name)
            input_tags = lineage_tags(inputs or {})
            commit, dirty = git_state(root)
            stack.enter_context(global_tracking_uri(uri))
            active = mlflow.start_run(
                experiment_id=experiment_id,
                run_name=f"{stage_name} {label}" if label else stage_name,
                nested=True,
                parent_run_id=_parent_run_id(client, uri),
                tags={"stage": stage_name, **process_tags()},
            )
            run = StageRun(client, active.info.run_id, root, uri=uri, stage=stage_name)
        try:
            run.set_tags({"git_commit": commit, "git_dirty": dirty, **input_tags, **(tags or {})})
            run.log_params(params or {})
            yield run
            with tracking_time():
                run._finish_outputs(
                    {
                        "run_id": run.run_id,
                        "experiment_id": experiment_id,
                        "stage": stage_name,
                        "tracking_uri": mask_uri(uri),  # markers are DVC outputs: no secrets
                        "git_commit": commit,
                    }
                )
        except BaseException as error:
            # The curve up to the failure is kept (sent, or spooled), and the error propagates.
            try:
                run._close("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            except Exception:  # never hide the stage's own error behind a tracking one
                log.warning("Could not end MLflow run %s.", run.run_id, exc_info=True)
            raise
        with tracking_time():
            run._close("FINISHED")


def final_flush_timeout_s() -> float:
    """The most a stage's end waits for its last metrics to reach the store:
    `RLHF_TRACKING_FLUSH_TIMEOUT_S` (seconds, default 30)."""
    raw = os.environ.get(FLUSH_TIMEOUT_ENV, "")
    if not raw.strip():
        return DEFAULT_FLUSH_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ValueError(
            f"{FLUSH_TIMEOUT_ENV}={raw!r} is not a number of seconds >= 0; set it to e.g. 30."
        )
    return seconds


def _end_run_offline(client: MlflowClient, run_id: str, status: str) -> None:
    """End the run locally (MLflow's active run) with one quick try at the store: no client
    retries, a 2 s timeout. The spool holds the status for the next stage start."""
    with _mlflow_http_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="2"):
        try:
            _end_run(client, run_id, status)
        except Exception as error:
            if not is_unreachable(error):
                raise


@contextmanager
def _mlflow_http_env(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
