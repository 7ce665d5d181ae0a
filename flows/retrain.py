"""The retrain flow: new preference data in, a better model out (or the champion kept).

    files in data/incoming/ -> ingest (validate, quarantine, merge into data/preferences)
    -> move them to data/incoming/processed/ -> `dvc add data/preferences` (version the store)
    -> nothing new? stop here and say so
    -> the pipeline flow (DVC reruns only what the new data touches) -> gate -> promote or keep

"Something new" means rows this run added to the store, or a store that changed since the
last pipeline run consumed it (rows added by `rlhf ingest`, whose event triggers this flow).
Two retrains never overlap: a Prefect global concurrency limit when a server is configured,
and always a file lock on the project, so even ephemeral runs take turns.
Loaded by path (`flows/retrain.py:retrain`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.exceptions import MissingContextError

from rlhf_core.paths import ProjectPaths
from rlhf_core.scripts import load_script
from rlhf_core.tracking.lineage import path_md5

pipeline = load_script(Path(__file__).with_name("pipeline.py")).pipeline

CONCURRENCY_LIMIT = "rlhf-retrain"
LOCK_FILE = Path(".dvc") / "tmp" / "rlhf-retrain.lock"  # DVC's own git-ignored scratch
PROCESSED_DIR = "processed"  # files ingested (or rejected by validation, see the manifest)
UNREADABLE_DIR = "unreadable"  # files that could not be read at all

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# One retrain at a time
# --------------------------------------------------------------------------------------------


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # outside a flow run (the lock used on its own)
        return log


def prefect_server_configured() -> bool:
    """Whether a Prefect API is configured (PREFECT_API_URL), as opposed to ephemeral mode."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


@contextmanager
def global_limit(name: str) -> Iterator[None]:
    """Hold the one slot of Prefect global concurrency limit `name` (created if missing)."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
    # A server hiccup while renewing the lease must not kill a long training run; the file
    # lock still keeps runs apart.
    with concurrency(name, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        yield


@contextmanager
def project_lock(project_root: Path) -> Iterator[None]:
    """An exclusive lock on the project's retrain lock file, waiting as long as it takes."""
    from filelock import FileLock, Timeout

    path = project_root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _logger().info("Another retrain of %s is running; waiting for it.", project_root)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def retrain_lock(project_root: Path) -> Iterator[None]:
    """The global limit (with a server) and the project's file lock, in that order."""
    if prefect_server_configured():
        with global_limit(CONCURRENCY_LIMIT), project_lock(project_root):
            yield
    else:
        with project_lock(project_root):
            yield


def pull_from_remote(project_root: Path) -> str | None:
    """`dvc pull` from the project's default remote, if it has one (`remote_sync.pull`); the
    remote's name. A failed pull stops the retrain before it ingests anything."""
    from rlhf_core.orchestration import remote_sync

    remote = remote_sync.default_remote(project_root)
    if remote is not None:
        _logger().info("%s", remote_sync.pull(project_root, remote))
    return remote


def share_results(project_root: Path, remote: str | None, message: str) -> list[str]:
    """After a retrain: `dvc push` to the remote (if any) and record dvc.lock as
    `orchestration.record_lock` says; one line each. A failed push or commit is logged as
    an error and reported, not raised: the results stay in this machine's cache and tree."""
    from rlhf_core.config import load_params
    from rlhf_core.orchestration import remote_sync

    params_file = project_root / "params.yaml"
    how = load_params(params_file).orchestration.record_lock if params_file.is_file() else "none"
    steps = [lambda: remote_sync.push(project_root, remote)] if remote else []
    steps.append(lambda: remote_sync.record_lock(project_root, how, f"rlhf retrain: {message}"))
    lines = []
    for step in steps:
        try:
            lines.append(step())
            _logger().info("%s", lines[-1])
        except remote_sync.RemoteSyncError as error:
            lines.append(str(error))
            _logger().error("%s", error)
    return lines


@contextmanager
def hold_store(store: Path) -> Iterator[None]:
    """The preference store's lock (`store_lock`) for the whole retrain, from ingest through
    the pipeline's read of the store to `dvc add`: an `rlhf ingest` meanwhile waits, so
    what the pipeline reads, what dvc.lock records and what the store's .dvc file versions
    are one version of the store. An ingest a crash cut short is finished or undone first."""
    from rlhf_core.data.store import recover_store
    from rlhf_core.data.store_lock import store_lock

    with store_lock(store, on_wait=_logger().info):
        if store.is_dir() and (finished := recover_store(store)):
            _logger().warning("Finished the ingest of %s that a crash interrupted.", finished)
        yield


# --------------------------------------------------------------------------------------------
# Incoming data
# --------------------------------------------------------------------------------------------


def candidate_win_rates(root: Path, decision: dict[str, Any]) -> str:
    """The gated candidate's gold and RM win rates over SFT beside people's win rate over
    the champion (`human_votes.win_rates_line`)."""
    from rlhf_core.evaluation.human_votes import win_rates_line

    metrics_file = ProjectPaths(root).metrics_file("evaluate")
    evaluation = {}
    if metrics_file.is_file():
        evaluation = json.loads(metrics_file.read_text(encoding="utf-8"))
    candidate = decision["candidate"]
    return win_rates_line(candidate, evaluation.get(candidate) or {}, decision.get("human"))


def incoming_files(incoming_dir: Path) -> list[Path]:
    """Files directly in `incoming_dir`, by name; hidden files and folders are ignored."""
    if not incoming_dir.is_dir():
        return []
    return sorted(
        path for path in incoming_dir.iterdir() if path.is_file() and not path.name.startswith(".")
    )


def move_to_processed(
    path: Path, folder: str = PROCESSED_DIR, reason: dict[str, Any] | None = None
) -> Path:
    """Move a handled file into `folder` beside it, never overwriting an earlier one; with a
    `reason`, write it beside the moved file as `<moved name>.reason.json` (the folder is not
    scanned for data, so it is never ingested)."""
    import json

    target_dir = path.parent / folder
    target_dir.mkdir(exist_ok=True)
    target = target_dir / path.name
    if target.exists() or target.is_symlink():
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = target_dir / f"{path.stem}.{stamp}.{time.time_ns() % 10**6}{path.suffix}"
    moved = Path(shutil.move(str(path), str(target)))
    if reason is not None:
        reason = {**reason, "moved_to": f"{folder}/{moved.name}"}
        text = json.dumps(reason, indent=2, ensure_ascii=False) + "\n"
        moved.with_name(moved.name + ".reason.json").write_text(text, encoding="utf-8")
    return moved


def locked_dep_md5(project_root: Path, dep: Path) -> str | None:
    """The md5 dvc.lock records for dependency `dep` (a path under the root), if any stage
    depends on it."""
    lock_file = project_root / "dvc.lock"
    if not lock_file.is_file():
        return None
    relative = dep.resolve().relative_to(project_root.resolve()).as_posix()
    stages = (yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}).get("stages") or {}
    for locked in stages.values():
        for entry in locked.get("deps") or []:
            if entry.get("path") == relative:
                return entry.get("md5")
    return None


def store_changed_since_last_run(project_root: Path, store: Path) -> bool:
    """Whether the store's content differs from what the last pipeline run read (dvc.lock).

    A store that no stage has read yet counts as changed once it holds anything.
    """
    if not store.is_dir() or not any(store.iterdir()):
        return False
    return path_md5(store) != locked_dep_md5(project_root, store)


def ingest_incoming(files: list[Path], store: Path, settings: Any) -> list[dict[str, Any]]:
    """Ingest each file into the store and move it out of the incoming folder.

    One record per file: the store's IngestResult fields, or status "unreadable" with the
    error for a file that cannot be read at all: an unknown format, over
    `data.validation.max_file_mb` (checked before the store archives a copy), not valid for
    its format (random bytes, a non-UTF-8 CSV header, a cut-off Parquet or gzip file), a
    symbolic link, a directory, or a file the process may not open. Such a file is moved to
    `unreadable/` with `<name>.reason.json` beside it (the error, when, its size and sha256),
    so no file blocks a later retrain. An error of the store or the disk is raised, leaving
    the file where it is.
    """
    import os
    from datetime import UTC, datetime

    from rlhf_core.data.readers import check_file_size
    from rlhf_core.data.store import ingest_files
    from rlhf_core.files import file_sha256

    logger = _logger()
    records = []
    for path in files:
        regular = path.is_file() and not path.is_symlink()
        try:
            if regular:  # before the store archives a copy of a file it will refuse
                check_file_size(path, settings.max_file_bytes)
            [result] = ingest_files([path], store, "preference", settings)
        except (ValueError, OSError) as error:
            # ValueError: the reader's or the store's refusal of this file. OSError: the
            # file's only when it names the file (PermissionError opening it) or the path is
            # no regular file; a full disk or an unwritable store stops the retrain instead,
            # leaving the file in place for the next one.
            named = isinstance(error, OSError) and error.filename == os.fspath(path)
            if not (isinstance(error, ValueError) or named or not regular):
                raise
            logger.warning("%s cannot be read, moved to %s/: %s", path.name, UNREADABLE_DIR, error)
            records.append(
                {"file": path.name, "status": "unreadable", "added": 0, "error": str(error)}
            )
            if not os.path.lexists(path):
                continue  # gone since it was listed: nothing to set aside
            reason: dict[str, Any] = {
                "file": path.name,
                "error": str(error),
                "error_type": type(error).__name__,
                "set_aside_at": datetime.now(UTC).isoformat(),
                "bytes": path.stat().st_size if regular else None,
                "sha256": None,  # of a link, its target is never read
            }
            if regular and not named:
                reason["sha256"] = file_sha256(path)
            move_to_processed(path, UNREADABLE_DIR, reason)
            continue
        logger.info("%s: %s, %d row(s) added", path.name, result.status, result.added)
        records.append(dataclasses.asdict(result))
        move_to_processed(path)
    return records


def track_preference_store(store: Path) -> str:
    """Version the store with `dvc add` (`track_store`) and log what happened.

    A DVC failure is logged as an error, not raised: the rows are merged either way, the
    pipeline still reads them, and the next tracked ingest versions them too.
    """
    from rlhf_core.orchestration.store_versioning import StoreTrackingError, track_store

    try:
        message = track_store(store).message
    except StoreTrackingError as error:
        _logger().error("%s", error)
        return str(error)
    _logger().info("%s", message)
    return message


def validation_settings(project_root: Path) -> Any:
    """data.validation of params.yaml for preference files, the token limit resolved from the
    stages' max_length (`Params.validation_for`); the defaults when there is no params.yaml."""
    from rlhf_core.config.data import ValidationSettings

    params_file = project_root / "params.yaml"
    if not params_file.is_file():
        return ValidationSettings()
    from rlhf_core.config import load_params

    return load_params(params_file).validation_for("preference")


# --------------------------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------------------------


@flow(name="rlhf-retrain", log_prints=True)
def retrain(project_root: str = ".", gate: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ingest new preference files, retrain what they touch, and gate the result.

    With a default DVC remote it pulls first and pushes after; `orchestration.record_lock`
    says whether the new dvc.lock is committed or copied (`share_results`).

    Returns {"status": "no_new_data" | "retrained", "message", "ingested" (one record per
    file), "added", "store_tracking" (what `dvc add` of the store did, when files came in or
    the store changed), "pipeline" (the pipeline summary, when it ran), "decision" (the
    gate's), "shared" (push and record, one line each, when anything changed), "locked_at",
    "released_at" (time.time() of the locked section)}.
    """
    root = Path(project_root).resolve()
    paths = ProjectPaths(root)
    with retrain_lock(root), hold_store(paths.preference_store):
        locked_at = time.time()
        remote = pull_from_remote(root)
        store_was_stale = store_changed_since_last_run(root, paths.preference_store)
        files = incoming_files(paths.incoming_dir)
        ingested = ingest_incoming(files, paths.preference_store, validation_settings(root))
        added = sum(record["added"] for record in ingested)
        outcome: dict[str, Any] = {"ingested": ingested, "added": added, "locked_at": locked_at}
        # Every version of the store a retrain reads is cached by DVC, as `dvc repro` does
        # with a changed data source; an unchanged store leaves its .dvc file as it was.
        if ingested or store_was_stale:
            outcome["store_tracking"] = track_preference_store(paths.preference_store)
        if added == 0 and not store_was_stale:
            message = (
                f"No new preference data ({len(files)} incoming file(s), 0 rows added, store "
                "unchanged since the last pipeline run): nothing to retrain."
            )
            print(message)
            outcome.update(status="no_new_data", message=message, pipeline=None, decision=None)
        else:
            why = f"{added} new row(s)" if added else "rows added to the store since the last run"
            print(f"Retraining on {why}.")
            summary = pipeline(project_root=str(root), gate=gate)
            decision = summary["gate"]
            message = f"Retrained on {why}; gate: {decision['status']}."
            if decision.get("candidate"):
                message += " " + candidate_win_rates(root, decision)
            print(message)
            outcome.update(status="retrained", message=message, pipeline=summary, decision=decision)
        if ingested or store_was_stale or outcome["status"] == "retrained":
            outcome["shared"] = share_results(root, remote, message)
        outcome["released_at"] = time.time()
    return outcome
