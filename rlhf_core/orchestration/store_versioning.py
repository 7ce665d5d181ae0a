"""Versioning the preference store after an ingest (`dvc add`), and announcing the new rows
to a served retrain deployment (the event `rlhf.preferences.ingested`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


INGESTED_EVENT = "rlhf.preferences.ingested"


class StoreTrackingError(RuntimeError):
    """`dvc add` of the store failed; the message is one line saying what to do."""


@dataclass(frozen=True)
class StoreTracking:
    """What `track_store` did: `dvc_file` is None when the store is not in a DVC project."""

    dvc_file: Path | None
    changed: bool
    message: str


def dvc_project_root(path: str | Path) -> Path | None:
    """The nearest folder above `path` that holds a `.dvc/` folder (a DVC project), or None."""
    for folder in Path(path).resolve().parents:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def track_store(store_dir: str | Path) -> StoreTracking:
    """Version the preference store with `dvc add` in the DVC project that holds it.

    `dvc add` caches the store's content and writes `<store>.dvc` beside it (its md5), so
    `git add` of that file and `dvc push` share the version and `dvc pull` restores it. It is
    idempotent: an unchanged store leaves the .dvc file as it was. A store outside any DVC
    project is skipped (the returned message says so). DVC runs as a subprocess of this
    interpreter, like the pipeline's stages; a failure raises StoreTrackingError.
    """
    store = Path(store_dir).resolve()
    root = dvc_project_root(store)
    if root is None:
        return StoreTracking(
            None,
            False,
            f"{store_dir} is not inside a DVC project (no .dvc/ folder above it): "
            "not tracked with dvc add",
        )
    target = store.relative_to(root).as_posix()
    dvc_file = store.with_name(store.name + ".dvc")
    before = dvc_file.read_text(encoding="utf-8") if dvc_file.is_file() else None
    # --no-relink: the store's files stay plain files. Ingestion appends to manifest.jsonl in
    # place, which would write into the cache through a hardlink or symlink (cache.type).
    # No --quiet: it hides DVC's errors too.
    command = [sys.executable, "-m", "dvc", "add", "--no-relink", target]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, check=False
        )
    except OSError as error:
        raise StoreTrackingError(f"Cannot run `dvc add {target}`: {error}.") from None
    if done.returncode != 0:
        raise StoreTrackingError(_dvc_add_failure(target, root, done.stdout + done.stderr))
    shown = target if root == Path.cwd().resolve() else f"{target} (in {root})"
    dvc_name = f"{target}.dvc"
    if dvc_file.read_text(encoding="utf-8") == before:
        return StoreTracking(dvc_file, False, f"{shown} is tracked as it is ({dvc_name} unchanged)")
    return StoreTracking(
        dvc_file,
        True,
        f"tracked {shown} with dvc add ({dvc_name}); `git add {dvc_name}` and `dvc push` to "
        "share it",
    )


def _dvc_add_failure(target: str, root: Path, output: str) -> str:
    """One line: DVC's last error, a hint when it is one a user can fix, and the way back."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR")]
    reason = (errors or lines or ["no output"])[-1].rstrip(".")
    hint = ""
    if "is git-ignored" in reason:
        # git cannot re-include a file whose folder is ignored, so `/data/` must become `/data/?*`
        folder = target.rpartition("/")[0]
        ignore_contents = f"`/{folder}/?*` (not `/{folder}/`) then " if folder else ""
        hint = f" (let git see it: {ignore_contents}`!/{target}.dvc` in .gitignore)"
    elif "Unable to acquire lock" in reason:
        hint = " (another DVC command, a pipeline run perhaps, holds the project)"
    return (
        f"`dvc add {target}` failed in {root}: {reason}{hint}. The store keeps what was "
        f"ingested; run `dvc add {target}` there once that is fixed."
    )


# --------------------------------------------------------------------------------------------
# rlhf ingest: the event that triggers a retrain
# --------------------------------------------------------------------------------------------


PROJECT_LABEL = "rlhf.project"


def ingested_resource_id(store_dir: str | Path) -> str:
    """The Prefect resource id of a preference store: `rlhf.preferences.<absolute path>`."""
    return f"rlhf.preferences.{Path(store_dir).resolve()}"


def project_name_of(store_dir: str | Path) -> str:
    """The name a store's project goes by on a shared Prefect server: the folder name of the
    DVC project that holds the store (of the store's grandparent outside one). Deployments
    on a work pool match it, not a path, which differs from machine to machine."""
    store = Path(store_dir).resolve()
    return (dvc_project_root(store) or store.parent.parent).name


def emit_ingested_event(
    store_dir: str | Path, results: Sequence[Any], project: str | None = None
) -> Any:
    """Emit INGESTED_EVENT for a store that gained rows, so a served retrain deployment runs.

    `results` are the store's IngestResults. Nothing is sent (None is returned) when no row
    was added or no Prefect API is configured (PREFECT_API_URL); then there is no server whose
    trigger could react, and starting an ephemeral one would be pointless. The resource is
    labelled with the project's name (`project`, by default `project_name_of`), which the
    work-pool deployment matches (`rlhf deploy`).
    """
    added = sum(result.added for result in results)
    if added == 0:
        log.debug("No rows added to %s: no event.", store_dir)
        return None
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        log.debug("No Prefect API configured (PREFECT_API_URL): %s not emitted.", INGESTED_EVENT)
        return None
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    event = emit_event(
        event=INGESTED_EVENT,
        resource={
            "prefect.resource.id": ingested_resource_id(store_dir),
            PROJECT_LABEL: project or project_name_of(store_dir),
        },
        payload={
            "store": str(Path(store_dir).resolve()),
            "added": added,
            "files": [result.file for result in results if result.added],
            "sha256": [result.sha256 for result in results if result.added],
        },
    )
    EventsWorker.drain_all(timeout=30)  # send now: the CLI process is about to exit
    return event
