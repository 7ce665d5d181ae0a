"""Lineage beside the outputs: md5s as DVC computes them, run markers, the producing run.

At a successful exit a stage run writes a marker *beside* each output it recorded
(`artifacts/.sft.run_info.json` for `artifacts/sft`), holding the run id and the output's
md5, so the next stage, a separate process, finds the producing run there. The marker is not
part of the output (`.dvcignore` hides it from DVC, `path_md5` skips it): outputs stay a pure
function of their inputs, and two runs on the same inputs give the same md5. A marker whose
md5 no longer matches the output (DVC restored another version) is not trusted: the run that
produced that content is looked up in the tracking store by its `output.<name>.md5` tag.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_INFO_FILE = "run_info.json"  # the suffix of an output's marker: `.<name>.run_info.json`
UNKNOWN = "unknown"
_HASH_BLOCK_BYTES = 1 << 20


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
    """Files DVC hashes in `directory`: the project's .dvcignore leaves out run markers and
    Python's bytecode caches."""
    for folder, subfolders, names in os.walk(directory):
        subfolders[:] = [name for name in subfolders if name != "__pycache__"]
        for name in names:
            if not is_run_marker(name) and not name.endswith(".pyc"):
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
        client = MlflowClient(tracking_uri=_with_credentials(uri))
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


def _with_credentials(recorded: str) -> str:
    """The marker records its store with credentials masked (`mask_uri`); the store in use
    (MLFLOW_TRACKING_URI, or the active tracking URI) when it is the same one, with its
    credentials, else the recorded URI as it is."""
    import mlflow

    from rlhf_core.tracking.check import mask_uri

    for current in (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()):
        if current and mask_uri(current) == recorded:
            return current
    return recorded


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
