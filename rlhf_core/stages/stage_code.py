"""The code a stage runs, as its dvc.yaml entry lists it: part of the checkpoint fingerprint.

DVC reruns a stage when one of its code dependencies changes; a checkpoint written by the old
code must not be resumed then (the weights would come from code that no longer exists). The
code dependencies are the stage's `deps` that are not data or models: not under `data/` or
`artifacts/` of the project, nor the base model (`${model.base}`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DATA_FOLDERS = ("data", "artifacts")


def stage_entry(
    dvc_file: Mapping[str, Any], stage: str, params: Mapping[str, Any] | None = None
) -> Mapping[str, Any] | None:
    """The body of the dvc.yaml stage whose command is `rlhf stage <stage>`, or the `do` body
    (`${item}` replaced) of a `foreach` stage running `rlhf stage ${item}` over items that
    hold `stage` (a list, or `${key}` of `params`); None when there is none."""
    for body in (dvc_file.get("stages") or {}).values():
        if not isinstance(body, Mapping):
            continue
        if "foreach" in body and isinstance(body.get("do"), Mapping):
            command = str(body["do"].get("cmd", "")).strip()
            items = _foreach_items(body["foreach"], params or {})
            if command == "rlhf stage ${item}" and stage in items:
                return _substitute(body["do"], stage)
        elif str(body.get("cmd", "")).strip() == f"rlhf stage {stage}":
            return body
    return None


def _foreach_items(foreach: Any, params: Mapping[str, Any]) -> list[Any]:
    """A foreach's items: a literal list, or the params value `${a.b}` names."""
    if isinstance(foreach, list):
        return foreach
    if isinstance(foreach, str) and foreach.startswith("${") and foreach.endswith("}"):
        value: Any = params
        for key in foreach[2:-1].split("."):
            value = value.get(key) if isinstance(value, Mapping) else None
        return value if isinstance(value, list) else []
    return []


def _substitute(body: Mapping[str, Any], item: str) -> dict[str, Any]:
    deps = [str(dep).replace("${item}", item) for dep in body.get("deps") or []]
    return {**body, "deps": deps}


def code_dependencies(
    dvc_file: Mapping[str, Any], stage: str, params: Mapping[str, Any] | None = None
) -> list[str]:
    """The stage's deps (as written in dvc.yaml) that are code, not data or models."""
    entry = stage_entry(dvc_file, stage, params)
    if entry is None:
        return []
    code = []
    for dep in entry.get("deps") or []:
        dep = str(dep)
        parts = Path(dep).parts
        if parts and parts[0] in DATA_FOLDERS:
            continue
        if "${" in dep:
            continue  # the base model (`${model.base}`): an input, fingerprinted by content
        code.append(dep)
    return code


def code_fingerprint(project_root: Path, stage: str) -> dict[str, str]:
    """{dep: md5} of the stage's code dependencies in the project's dvc.yaml (empty without
    one: a stage run from Python, not DVC). A dep that does not exist counts as "missing"."""
    import yaml

    from rlhf_core.tracking.lineage import path_md5

    root = Path(project_root)
    if not (root / "dvc.yaml").is_file():
        return {}
    try:
        dvc_file = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
        params_file = root / "params.yaml"
        params = {}
        if params_file.is_file():
            params = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        log.warning("unreadable YAML in %s (%s): stage code not fingerprinted", root, error)
        return {}
    fingerprint = {}
    for dep in code_dependencies(dvc_file, stage, params or {}):
        path = Path(project_root) / dep
        fingerprint[dep] = path_md5(path) if path.exists() else "missing"
    return fingerprint
