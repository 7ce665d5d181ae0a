"""What a stage could not send to the tracking store, kept on disk until the store answers.

While the store is down a stage keeps training: its metrics, the tags it sets and the status
its run should end with go to `artifacts/tracking_spool/<run id>.jsonl` (git-ignored, not a
DVC output, so an outage never changes a stage's outputs). One JSON object a line:

    {"run_id": ..., "stage": "sft", "store": "http://***@host:5000", "host": ..., "pid": ...}
    {"metrics": [["train/loss", 0.71, 1764617225123, 12], ...]}   key, value, timestamp ms, step
    {"tags": {"output.artifacts/sft.md5": "..."}}
    {"not_logged": ["model", "plots/sft_curves.png"]}             left out: the files stay local
    {"end": "FINISHED"}

The next stage start on this host sends each spool of the same store into its run (metrics
keep their steps and timestamps; the store drops a metric it already holds, so a spool sent
twice adds nothing), sets the tag `rlhf.tracking.outage` saying what arrived late and what was
never logged, ends the run with the recorded status (FAILED when the process died first) and
deletes the spool. The spool of a stage still running (no end line, its process alive) is
left to it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.tracking.check import mask_uri
from rlhf_core.tracking.orphans import process_alive

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

log = logging.getLogger(__name__)

OUTAGE_TAG = "rlhf.tracking.outage"
SPOOL_FOLDER = Path("artifacts") / "tracking_spool"
MAX_BATCH = 1000  # metrics per store call (MLflow's log_batch limit)


def spool_dir(project_root: Path) -> Path:
    """The project's spool folder: git-ignored (`/artifacts/*`), not a DVC output."""
    return Path(project_root) / SPOOL_FOLDER


class Spool:
    """The spool file of one run; appended from any thread (a lock keeps lines whole).

    The file is created, with its header, on the first append: a run whose store never failed
    leaves no file.
    """

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self._header = header
        self._lock = threading.Lock()

    @classmethod
    def for_run(cls, project_root: Path, run_id: str, stage: str, uri: str) -> Spool:
        """The spool of `run_id`, its header naming this process and the store (masked)."""
        import psutil

        header = {
            "run_id": run_id,
            "stage": stage,
            "store": mask_uri(uri),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": psutil.Process(os.getpid()).create_time(),
        }
        return cls(spool_dir(project_root) / f"{run_id}.jsonl", header)

    def exists(self) -> bool:
        return self.path.is_file()

    def append_metrics(self, metrics: Iterable[Metric]) -> int:
        """Append metrics in their order; returns how many."""
        rows = [[m.key, m.value, m.timestamp, m.step] for m in metrics]
        if rows:
            self._append(
                [{"metrics": rows[i : i + MAX_BATCH]} for i in range(0, len(rows), MAX_BATCH)]
            )
        return len(rows)

    def append_tags(self, tags: dict[str, str]) -> None:
        self._append([{"tags": dict(tags)}])

    def append_not_logged(self, names: Iterable[str]) -> None:
        self._append([{"not_logged": list(names)}])

    def append_end(self, status: str) -> None:
        self._append([{"end": status}])

    def metric_lines(self, skip: int = 0) -> list[tuple[int, list[Metric]]]:
        """(line number, metrics) of the metric lines after the first `skip` lines."""
        with self._lock:
            records = list(_records(self.path))
        return [
            (number, _metrics(record["metrics"]))
            for number, record in records
            if number >= skip and "metrics" in record
        ]

    def remove(self) -> None:
        """Delete the file (all of it was sent)."""
        with self._lock:
            self.path.unlink(missing_ok=True)

    def _append(self, records: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(record, allow_nan=True) + "\n" for record in records)
        with self._lock:
            new = not self.path.exists()
            if new:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                lines = json.dumps(self._header) + "\n" + lines
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(lines)
                handle.flush()
                os.fsync(handle.fileno())


@dataclass
class SpooledRun:
    """A spool file read back: its header and what it holds, in order."""

    path: Path
    header: dict[str, Any]
    metrics: list[Metric] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    not_logged: list[str] = field(default_factory=list)
    end: str | None = None  # None: the process died before the stage ended

    @property
    def run_id(self) -> str:
        return self.header["run_id"]


def read_spool(path: Path) -> SpooledRun:
    """Read a spool file; a torn last line (the process died mid-write) is left out."""
    records = [record for _, record in _records(path)]
    if not records or "run_id" not in records[0]:
        raise ValueError(f"{path} is not a tracking spool (no header line with a run_id).")
    spooled = SpooledRun(Path(path), records[0])
    for record in records[1:]:
        spooled.metrics.extend(_metrics(record.get("metrics", [])))
        spooled.tags.update(record.get("tags", {}))
        spooled.not_logged.extend(record.get("not_logged", []))
        spooled.end = record.get("end", spooled.end)
    return spooled


def replay_spools(client: MlflowClient, project_root: Path, uri: str) -> list[str]:
    """Send every finished spool of store `uri` into its run and end the run (module
    docstring); returns the run ids. A spool that cannot be sent is kept and named in a
    warning (as `<run id>.failed.jsonl` when the store refused it, so it is not retried)."""
    from mlflow.exceptions import MlflowException

    replayed = []
    for path in sorted(spool_dir(project_root).glob("*.jsonl")):
        if path.name.endswith(".failed.jsonl"):
            continue
        try:
            spooled = read_spool(path)
        except (OSError, ValueError) as error:
            log.warning("Tracking spool %s cannot be read and is left alone: %s", path, error)
            continue
        if not _ready(spooled, uri):
            continue
        try:
            _send(client, spooled)
        except MlflowException as error:
            if is_unreachable(error):
                log.warning(
                    "Tracking spool %s not sent: the store %s does not answer; kept for the "
                    "next start.",
                    path,
                    mask_uri(uri),
                )
                break
            failed = path.with_name(f"{spooled.run_id}.failed.jsonl")
            path.rename(failed)
            log.warning(
                "Tracking spool %s was refused by %s (%s); kept as %s.",
                path,
                mask_uri(uri),
                str(error).splitlines()[0],
                failed,
            )
            continue
        path.unlink()
        replayed.append(spooled.run_id)
        log.warning(
            "MLflow run %s (%s): %d metrics kept during a tracking outage were sent late; "
            "run ended %s, tag %s.",
            spooled.run_id,
            spooled.header.get("stage", "?"),
            len(spooled.metrics),
            spooled.end or "FAILED",
            OUTAGE_TAG,
        )
    return replayed


def outage_note(spooled: SpooledRun, when: datetime) -> str:
    """The value of the outage tag: what arrived late, when, and what was never logged."""
    note = (
        f"the tracking store did not answer before the run ended; {len(spooled.metrics)} "
        f"metrics and {len(spooled.tags)} tags were sent at {when:%Y-%m-%d %H:%M:%S} UTC"
    )
    if spooled.end is None:
        note += "; the process died before the stage ended"
    if spooled.not_logged:
        note += f"; not logged (the files stay in the project): {', '.join(spooled.not_logged)}"
    return note


def is_unreachable(error: BaseException) -> bool:
    """Whether `error` says the store could not be reached (connection refused or reset, no
    answer in time), as opposed to the store refusing the request."""
    import requests

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        if isinstance(seen, ConnectionError | TimeoutError):
            return True
        text = str(seen)
        if text.startswith("API request to") and "failed with" in text and "error code" not in text:
            return True  # MLflow's wrapper of a requests error (raised without `from`)
        seen = seen.__cause__ or seen.__context__
    return False


def _ready(spooled: SpooledRun, uri: str) -> bool:
    """A spool of this store that is complete: its run ended (a process running stages one
    after another, such as a warm worker, is still alive), or its process is gone; a spool
    of a stage still running is being written."""
    header = spooled.header
    if header.get("store") != mask_uri(uri) or header.get("host") != socket.gethostname():
        return False
    if spooled.end is not None:
        return True
    try:
        alive = process_alive(int(header["pid"]), float(header["started"]))
    except (KeyError, TypeError, ValueError):
        alive = False
    return not alive


def _send(client: MlflowClient, spooled: SpooledRun) -> None:
    from mlflow.entities import RunTag

    for start in range(0, len(spooled.metrics), MAX_BATCH):
        client.log_batch(spooled.run_id, metrics=spooled.metrics[start : start + MAX_BATCH])
    tags = {**spooled.tags, OUTAGE_TAG: outage_note(spooled, datetime.now(UTC))}
    client.log_batch(spooled.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    client.set_terminated(spooled.run_id, status=spooled.end or "FAILED")


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of each whole line; a torn line (a write cut short) is skipped."""
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError:
                log.warning("Tracking spool %s: line %d is torn and left out.", path, number + 1)


def _metrics(rows: list[list[Any]]) -> list[Metric]:
    from mlflow.entities import Metric

    return [Metric(key=k, value=float(v), timestamp=int(t), step=int(s)) for k, v, t, s in rows]
