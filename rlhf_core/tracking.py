"""MLflow tracking and lineage: one MLflow run per pipeline stage.

Every stage process opens its run through `stage_run`. The run carries the stage's params
(flattened to dotted keys), the git commit, the md5 of each input (the same value DVC writes
to dvc.lock) and the id of the run that produced each input. Lineage never depends on an
orchestrator: at a successful exit the run writes a marker *beside* each output it recorded
(`artifacts/.sft.run_info.json` for `artifacts/sft`), holding the run id and the output's
md5, so the next stage, a separate process, finds the producing run there. The marker is not
part of the output (`.dvcignore` hides it from DVC, `path_md5` skips it): outputs stay a pure
function of their inputs, and two runs on the same inputs give the same md5. A marker whose
md5 no longer matches the output (DVC restored another version) is not trusted: the run that
produced that content is looked up in the tracking store by its `output.<name>.md5` tag.

    with stage_run("sft", params=params.model_dump(), inputs={"train": sft_path}) as run:
        for step, loss in enumerate(losses):
            run.log_metrics({"train/loss": loss}, step=step)
        run.record_output(model_dir)

The store is the project's own `sqlite:///<root>/mlflow.db` with artifacts under
`<root>/mlruns`, unless `MLFLOW_TRACKING_URI` names another. When the orchestrator sets
`MLFLOW_PARENT_RUN_ID`, the stage's run is nested under that pipeline run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.timing import counts_as_tracking, tracking_time

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Metric

log = logging.getLogger(__name__)

EXPERIMENT_NAME = "rlhf"
EXPERIMENT_ENV = "RLHF_EXPERIMENT"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
PARENT_RUN_ENV = "MLFLOW_PARENT_RUN_ID"
# The MLflow UI (3.x) reads this experiment tag to choose between its GenAI view (traces,
# judges) and its model-training view (runs table with metrics, charts); values are in its
# front end (`mlflow/server/js`): genai_development, custom_model_development, ...
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
RUN_INFO_FILE = "run_info.json"  # the suffix of an output's marker: `.<name>.run_info.json`
UNKNOWN = "unknown"

# A metric buffer is written after this many `log_metrics` calls or this many seconds,
# whichever comes first, and always at the end of the run.
FLUSH_EVERY_CALLS = 50
FLUSH_EVERY_SECONDS = 30.0
_HASH_BLOCK_BYTES = 1 << 20
# Remote stores choose their own artifact root; only these schemes get one in the project.
_SERVER_SCHEMES = ("http://", "https://", "databricks")
_DATASET_READERS = {".parquet": "parquet", ".jsonl": "jsonl", ".csv": "csv"}


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


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"dotted.key": "value"}; lists and tuples as JSON, the rest as str.

    An empty mapping is kept as "{}" so that its key still shows up in the run.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{dotted}."))
        elif isinstance(value, Mapping):
            flat[dotted] = "{}"
        elif isinstance(value, list | tuple):
            flat[dotted] = json.dumps(value, default=str)
        else:
            flat[dotted] = str(value)
    return flat


def file_md5(path: Path) -> str:
    """Hex md5 of a file's bytes, read in 1 MiB blocks (DVC 3's plain `md5`)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def path_md5(path: Path) -> str:
    """md5 of a file, or of a directory the way DVC 3 computes it for dvc.lock.

    A directory's md5 is `md5(json.dumps(entries, sort_keys=True)) + ".dir"`, where entries
    is `[{"md5": <file md5>, "relpath": <posix path relative to the dir>}, ...]` sorted by
    relpath. It depends only on file contents and names, never on mtimes; empty
    subdirectories do not count.
    """
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        raise ValueError(f"Cannot hash {path}: it is neither a file nor a directory.")
    entries = [
        {"md5": file_md5(file), "relpath": file.relative_to(path).as_posix()}
        for file in _files_under(path)
    ]
    entries.sort(key=lambda entry: entry["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def _files_under(directory: Path) -> Iterator[Path]:
    for folder, _, names in os.walk(directory):
        for name in names:
            if not is_run_marker(name):  # as `.dvcignore` tells DVC
                yield Path(folder) / name


def is_run_marker(name: str) -> bool:
    """Whether a file name is an output's run marker (`.<output>.run_info.json`)."""
    return name.startswith(".") and name.endswith(f".{RUN_INFO_FILE}")


def run_marker_path(output: Path) -> Path:
    """Where the run marker of an output lives: beside it, `<parent>/.<name>.run_info.json`."""
    output = Path(output)
    return output.parent / f".{output.name}.{RUN_INFO_FILE}"


def git_state(project_root: Path) -> tuple[str, str]:
    """(commit at HEAD, "true"/"false" dirty) of the repo holding project_root, or "unknown".

    Dirty means tracked changes or untracked files that git does not ignore; dvc.lock is left
    out because `dvc repro` itself rewrites it between stages.
    """
    commit = _git(project_root, "rev-parse", "HEAD")
    if commit is None:
        return UNKNOWN, UNKNOWN
    status = _git(project_root, "status", "--porcelain", "--", ".", ":(exclude)dvc.lock")
    return commit, UNKNOWN if status is None else str(bool(status)).lower()


def _git(cwd: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _stat_signature(path: Path) -> list[list[Any]]:
    """[relative name, size, mtime_ns] of each file of an output: a cheap "unchanged" test."""
    if path.is_file():
        stat = path.stat()
        return [[path.name, stat.st_size, stat.st_mtime_ns]]
    rows = []
    for file in _files_under(path):
        stat = file.stat()
        rows.append([file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns])
    return sorted(rows)


def write_run_marker(output: Path, run_info: Mapping[str, str]) -> str:
    """Write the marker beside `output` (its run info, md5 and stat signature); the md5."""
    output = Path(output)
    md5 = path_md5(output)
    marker = {**run_info, "md5": md5, "files": _stat_signature(output)}
    run_marker_path(output).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return md5


def _read_marker(output: Path) -> dict[str, Any] | None:
    marker = run_marker_path(output)
    if not marker.is_file():
        return None
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        content = None
    if isinstance(content, dict) and content.get("run_id") and content.get("md5"):
        return content
    log.warning("Ignoring %s: it is not a run marker written by stage_run.", marker)
    return None


def read_producer_run_id(path: Path) -> str | None:
    """Id of the run that produced `path` (an output, or a file inside an output directory).

    The marker beside the output names the run; it counts only while the output still has
    the md5 the marker recorded (unchanged files are recognised by size and mtime without
    hashing). When DVC restored other content, the run whose `output.<name>.md5` tag has the
    current md5 is looked up in the tracking store the marker names. None when neither knows.
    """
    path = Path(path)
    output, marker = path, _read_marker(path)
    if marker is None and path.is_file():
        output, marker = path.parent, _read_marker(path.parent)
    if marker is None or not output.exists():
        return None
    if marker.get("files") == _stat_signature(output):
        return marker["run_id"]
    md5 = path_md5(output)
    if md5 == marker["md5"]:
        return marker["run_id"]
    return _run_with_output_md5(marker, md5)


def _run_with_output_md5(marker: Mapping[str, Any], md5: str) -> str | None:
    """The run in the marker's tracking store whose output `marker["output"]` has `md5`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, uri = marker.get("output"), marker.get("tracking_uri")
    if not name or not uri:
        return None
    try:
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs(
            [marker["experiment_id"]],
            filter_string=f"tags.`output.{name}.md5` = '{md5}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    except MlflowException as error:
        log.warning("Cannot look up the run that produced %s (md5 %s): %s", name, md5, error)
        return None
    return runs[0].info.run_id if runs else None


def lineage_tags(inputs: Mapping[str, Path]) -> dict[str, str]:
    """Tags `input.<name>.path`, `.md5` and (when known) `.run_id` for each input path."""
    tags: dict[str, str] = {}
    for name, path in inputs.items():
        path = Path(path)
        if not path.exists():
            raise ValueError(f"Input '{name}' does not exist: {path}.")
        tags[f"input.{name}.path"] = str(path)
        tags[f"input.{name}.md5"] = path_md5(path)
        producer = read_producer_run_id(path)
        if producer is not None:
            tags[f"input.{name}.run_id"] = producer
    return tags


class StageRun:
    """The MLflow run of one stage: buffered metrics, artifacts, datasets and outputs."""

    def __init__(self, client: MlflowClient, run_id: str, project_root: Path) -> None:
        self._client = client
        self._run_id = run_id
        self._project_root = Path(project_root)
        self._pending: list[Metric] = []
        self._calls_since_flush = 0
        self._last_flush = time.monotonic()
        self._outputs: dict[str, Path] = {}

    @property
    def run_id(self) -> str:
        """The MLflow run id."""
        return self._run_id

    @counts_as_tracking
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer one step's metrics; written every FLUSH_EVERY_CALLS calls or seconds."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._pending.extend(
            Metric(key=key, value=float(value), timestamp=timestamp, step=int(step))
            for key, value in metrics.items()
        )
        self._calls_since_flush += 1
        if (
            self._calls_since_flush >= FLUSH_EVERY_CALLS
            or time.monotonic() - self._last_flush >= FLUSH_EVERY_SECONDS
        ):
            self.flush()

    @counts_as_tracking
    def flush(self) -> None:
        """Write buffered metrics now (the client splits them into batches of <= 1000)."""
        if self._pending:
            self._client.log_batch(self._run_id, metrics=self._pending)
        self._pending = []
        self._calls_since_flush = 0
        self._last_flush = time.monotonic()

    @counts_as_tracking
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a nested mapping of params under dotted keys (<= 100 per store call)."""
        from mlflow.entities import Param

        flat = flatten_params(params)
        self._client.log_batch(self._run_id, params=[Param(k, v) for k, v in flat.items()])

    @counts_as_tracking
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags, values as strings (<= 100 per store call)."""
        from mlflow.entities import RunTag

        self._client.log_batch(self._run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @counts_as_tracking
    def log_figure(self, figure: Any, artifact_path: str) -> None:
        """Save a matplotlib or plotly figure as the artifact file `artifact_path`."""
        self._client.log_figure(self._run_id, figure, artifact_path)

    @counts_as_tracking
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy one local file into the run's artifacts (under `artifact_path` if given)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Cannot log artifact {path}: no such file.")
        self._client.log_artifact(self._run_id, str(path), artifact_path)

    @counts_as_tracking
    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        """Copy a local directory's contents into the run's artifacts under `artifact_path`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"Cannot log artifacts from {directory}: no such directory.")
        self._client.log_artifacts(self._run_id, str(directory), artifact_path)

    @counts_as_tracking
    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Write a JSON/YAML-serialisable object as `artifact_file` (format from its suffix)."""
        self._client.log_dict(self._run_id, obj, artifact_file)

    @counts_as_tracking
    def log_model_dir(self, model_dir: Path, artifact_path: str) -> str:
        """Log a `save_pretrained` directory as the MLflow model `artifact_path`; its model id.

        The model is a pyfunc wrapping a copy of the directory (`rlhf_core.mlflow_models`),
        so `mlflow.pyfunc.load_model` and `mlflow models serve` work on it and on every
        registry version made from it. Tags `model.<artifact_path>.md5` (the directory's
        DVC md5) and `model.<artifact_path>.model_id` (the logged model, `m-...`).
        """
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{model_dir} is not a save_pretrained model directory.")
        model_id = self._log_pyfunc_model(model_dir, artifact_path)
        self.set_tags(
            {
                f"model.{artifact_path}.md5": path_md5(model_dir),
                f"model.{artifact_path}.model_id": model_id,
            }
        )
        return model_id

    def _log_pyfunc_model(self, model_dir: Path, name: str) -> str:
        import mlflow

        from rlhf_core.mlflow_models import log_pretrained_model

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
        self._client.log_inputs(self._run_id, datasets=[DatasetInput(entity, input_tags)])
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
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at `uri`, then restore what was there (URI and env var)."""
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
    on an exception it ends FAILED (KILLED for Ctrl-C) and the exception propagates.
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
            input_tags = lineage_tags(inputs or {})
            commit, dirty = git_state(root)
            stack.enter_context(_global_tracking_uri(uri))
            active = mlflow.start_run(
                experiment_id=experiment_id,
                run_name=f"{stage_name} {label}" if label else stage_name,
                nested=True,
                parent_run_id=_parent_run_id(client, uri),
                tags={"stage": stage_name},
            )
            run = StageRun(client, active.info.run_id, root)
        try:
            run.set_tags({"git_commit": commit, "git_dirty": dirty, **input_tags, **(tags or {})})
            run.log_params(params or {})
            yield run
            with tracking_time():
                run.flush()
                run._finish_outputs(
                    {
                        "run_id": run.run_id,
                        "experiment_id": experiment_id,
                        "stage": stage_name,
                        "tracking_uri": uri,
                        "git_commit": commit,
                    }
                )
        except BaseException as error:
            _flush_quietly(run)
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            _end_run(client, run.run_id, status)
            raise
        with tracking_time():
            _end_run(client, run.run_id, "FINISHED")


def _flush_quietly(run: StageRun) -> None:
    # Keep the curve up to the failure, but never hide the original exception.
    try:
        run.flush()
    except Exception:
        log.warning("Could not write the last metrics of run %s.", run.run_id, exc_info=True)
