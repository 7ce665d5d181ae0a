"""MLflow tracking and lineage: one MLflow run per pipeline stage.

Every stage process opens its run through `stage_run`. The run carries the stage's params
(flattened to dotted keys), the git commit, the md5 of each input (the same value DVC writes
to dvc.lock) and the id of the run that produced each input. Lineage never depends on an
orchestrator: at a successful exit the run writes a `run_info.json` marker into each output
directory it recorded, so the next stage, a separate process, finds the producing run there.

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
RUN_INFO_FILE = "run_info.json"
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
            yield Path(folder) / name


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


def read_producer_run_id(path: Path) -> str | None:
    """Run id in the `run_info.json` of a directory, or of a file's parent directory."""
    path = Path(path)
    marker = (path if path.is_dir() else path.parent) / RUN_INFO_FILE
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())["run_id"]
    except (json.JSONDecodeError, KeyError, TypeError):
        log.warning("Ignoring %s: it is not a run_info.json written by stage_run.", marker)
        return None


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
    def log_model_dir(self, model_dir: Path, artifact_path: str) -> None:
        """Log a `save_pretrained` directory as plain artifacts, with its md5 as a tag."""
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{model_dir} is not a save_pretrained model directory.")
        self.log_artifacts(model_dir, artifact_path)
        self.set_tags({f"model.{artifact_path}.md5": path_md5(model_dir)})

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
        and, for a directory, `run_info.json` is written into it for the next stage to read.

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
            if path.is_dir():
                (path / RUN_INFO_FILE).write_text(json.dumps(run_info, indent=2) + "\n")
            tags[f"output.{name}.path"] = str(path)
            tags[f"output.{name}.md5"] = path_md5(path)
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
    """Id of experiment `name`, created with artifact root `location` if it does not exist."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=location)
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
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage, with params, lineage tags and output markers.

    The run is named `stage_name`, lives in the project's experiment, and is nested under
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
                run_name=stage_name,
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
