"""A retrain on a team's machines shares its data through the project's DVC remote and its
record through git: `dvc pull` before (the store and the outputs the last run pushed, so an
ingest merges into the team's store, not an empty one, and unchanged stages are not rerun),
`dvc push` after (the new store version, models and metrics), and the new `dvc.lock` with the
store's .dvc file committed or copied where `orchestration.record_lock` says.

Nothing happens without a default remote (`dvc remote add -d`): one machine needs none. DVC
and git run as subprocesses in the project; credentials come from their environment only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

RECORDED_FILES = ("dvc.lock", "data/preferences.dvc")  # and every `cache: false` output


class RemoteSyncError(RuntimeError):
    """`dvc pull` or `dvc push` failed; the message is one line with DVC's reason."""


def _dvc(root: Path, *args: str, timeout_s: float = 3600.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def default_remote(project_root: Path) -> str | None:
    """The name of the project's default DVC remote (`core.remote`), or None."""
    done = _dvc(project_root, "remote", "default", timeout_s=60)
    name = done.stdout.strip()
    return name if done.returncode == 0 and name else None


def _reason(done: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR")]
    return (errors or lines or [f"exit {done.returncode}"])[-1]


def pull(project_root: Path, remote: str) -> str:
    """`dvc pull --allow-missing`: what dvc.lock and the .dvc files name, where the remote
    has it (an output no run pushed yet is rebuilt, not an error). Never --force: a local
    change DVC would overwrite is an error, not lost. RemoteSyncError naming the remote when
    DVC fails: a retrain must not ingest into a store it could not fetch."""
    done = _dvc(project_root, "pull", "--allow-missing")
    if done.returncode != 0:
        raise RemoteSyncError(
            f"`dvc pull` from remote {remote!r} failed: {_reason(done)}. Nothing was ingested "
            "or retrained; fix the remote (credentials: AWS_* or the remote's own variables "
            "in the environment) and retrain again."
        )
    return f"pulled from remote {remote!r}"


def push(project_root: Path, remote: str) -> str:
    """`dvc push` of the store and every output; RemoteSyncError with DVC's reason."""
    done = _dvc(project_root, "push")
    if done.returncode != 0:
        raise RemoteSyncError(
            f"`dvc push` to remote {remote!r} failed: {_reason(done)}. The results are in "
            "this machine's DVC cache; `dvc push` there once the remote is fixed."
        )
    return f"pushed to remote {remote!r}"


def record_lock(project_root: Path, how: str, message: str) -> str:
    """Record the new dvc.lock and store version: `how` = "none", "commit" (a git commit of
    RECORDED_FILES and the uncached outputs, when they changed) or a file path to copy
    dvc.lock to. A one-line account of what was done."""
    if how == "none":
        return "dvc.lock not recorded (orchestration.record_lock: none)"
    if how != "commit":
        target = Path(how) if Path(how).is_absolute() else project_root / how
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(project_root / "dvc.lock", target)
        return f"copied dvc.lock to {target}"
    recorded = [*RECORDED_FILES, *uncached_outputs(project_root)]
    present = [name for name in recorded if (project_root / name).is_file()]
    _git(project_root, "add", "--", *present)
    staged = _git(project_root, "diff", "--cached", "--name-only", "--", *present).split()
    if not staged:
        return "dvc.lock and the store's .dvc file unchanged: nothing to commit"
    _git(project_root, "commit", "-q", "-m", message, "--", *staged)
    commit = _git(project_root, "rev-parse", "--short", "HEAD").strip()
    return f"committed {', '.join(staged)} as {commit}"


def uncached_outputs(project_root: Path) -> list[str]:
    """The outputs dvc.yaml declares `cache: false` (metrics and plots files): git, not the
    DVC cache, carries them, so a clone's `dvc status` is clean only when they are committed
    with dvc.lock. Paths relative to the project."""
    from dvc.repo import Repo

    root = project_root.resolve()
    with Repo(str(root)) as repo:
        paths = {
            Path(out.fs_path).resolve().relative_to(root).as_posix()
            for stage in repo.index.stages
            for out in stage.outs
            if not out.use_cache
        }
    return sorted(paths)


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        raise RemoteSyncError(
            f"`git {args[0]}` in {root} failed: {reason[-1] if reason else done.returncode}"
        )
    return done.stdout
