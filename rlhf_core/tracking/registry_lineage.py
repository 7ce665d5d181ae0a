"""The lineage of a registered model version: the stage runs behind it, and its lineage file.

A registered version carries only the tags a reviewer reads (`registry.version_tags`); its
full lineage (the upstream runs with their input md5s, the md5 of every data set upstream,
params, all metrics) is a JSON artifact of the producing run (`lineage_record`), named in the
version's tag `lineage` and read back by `version_lineage`. `lineage_chain` is the walk
behind it: from a run, through the `input.<name>.run_id` tags that `tracking.lineage` writes,
to every stage run upstream. MLflow is imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.tracking.lineage import UNKNOWN

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"  # the name stages log their model under (`log_model_dir`)
LINEAGE_TAG = "lineage"  # a version's tag naming its lineage file (`runs:/<run>/lineage/...`)
LINEAGE_FOLDER = "lineage"  # where the producing run keeps its versions' lineage files

_INPUT_FIELDS = ("md5", "path", "run_id")
_TAG_KEY_UNSAFE = re.compile(r"[^\w./\- ]")


def lineage_chain(client: MlflowClient, run_id: str) -> list[dict[str, Any]]:
    """The stage runs behind `run_id`, nearest first, found by following `input.*.run_id` tags.

    Breadth-first from `run_id` itself; a run reached twice (two inputs made by one run, or a
    cycle in hand-edited tags) appears once. Each entry is
    `{"run_id", "stage", "git_commit", "inputs": {name: {"md5", "path", "run_id"}}}` with the
    fields a run's tags hold; a run id that is not in the store gives an entry with
    `stage` None and no inputs.
    """
    from mlflow.exceptions import MlflowException

    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    queue = deque([run_id])
    while queue:
        current = queue.popleft()
        if current in seen:
            continue
        seen.add(current)
        try:
            run = client.get_run(current)
        except MlflowException:
            log.warning("Lineage stops at run %s: it is not in the tracking store.", current)
            chain.append({"run_id": current, "stage": None, "git_commit": None, "inputs": {}})
            continue
        inputs = _inputs_from_tags(run.data.tags)
        chain.append(
            {
                "run_id": current,
                "stage": run.data.tags.get("stage", run.info.run_name),
                "git_commit": run.data.tags.get("git_commit"),
                "inputs": inputs,
            }
        )
        for name in sorted(inputs):
            upstream = inputs[name].get("run_id")
            if upstream and upstream not in seen:
                queue.append(upstream)
    return chain


def data_lineage_tags(chain: list[dict[str, Any]], project_root: Path) -> dict[str, str]:
    """`lineage.data.<path under data/>.md5` for every data input anywhere in `chain`.

    An input outside `data/` that no run produced (a user's base model, a file elsewhere) is
    tagged `lineage.external.<input name>.md5`; inputs made by upstream runs are covered by
    `lineage.runs`. When two runs read one path with different md5s, the nearest run wins
    and a warning says the chain is inconsistent (e.g. a stage was not rerun on new data).
    """
    tags: dict[str, str] = {}
    for entry in chain:
        for name, fields in sorted(entry["inputs"].items()):
            md5 = fields.get("md5")
            if not md5:
                continue
            location = _data_location(fields.get("path"), project_root)
            if location is None:
                if fields.get("run_id"):
                    continue
                location = f"external.{name}"
            key = tag_key(f"lineage.{location}.md5")
            if key in tags and tags[key] != md5:
                log.warning(
                    "Run %s read %s with md5 %s, but a later run read it with md5 %s.",
                    entry["run_id"],
                    fields.get("path", name),
                    md5,
                    tags[key],
                )
                continue
            tags[key] = md5
    return tags


def _inputs_from_tags(tags: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """{name: {"md5", "path", "run_id"}} from a run's `input.<name>.<field>` tags."""
    inputs: dict[str, dict[str, str]] = {}
    for key, value in tags.items():
        if not key.startswith("input."):
            continue
        name, _, field = key[len("input.") :].rpartition(".")
        if name and field in _INPUT_FIELDS:
            inputs.setdefault(name, {})[field] = value
    return inputs


def _data_location(path_text: str | None, project_root: Path) -> str | None:
    """ "data.<rest>" for a path under the project's data/ folder, else None."""
    if not path_text:
        return None
    path = Path(path_text)
    if path.is_absolute():
        try:
            path = Path(os.path.realpath(path)).relative_to(os.path.realpath(project_root))
        except ValueError:
            return None
    parts = path.parts
    if not parts or parts[0] != "data" or ".." in parts:
        return None
    return ".".join(["data", "/".join(parts[1:])]) if len(parts) > 1 else "data"


def tag_key(key: str) -> str:
    """MLflow accepts letters, digits, `_ . / - ` and space in tag keys; the rest become `_`."""
    return _TAG_KEY_UNSAFE.sub("_", key)


def lineage_record(
    name: str,
    version: str,
    run: Run,
    chain: list[dict[str, Any]],
    project_root: Path,
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The full lineage of version `version` of `name`, registered from `run`, as a dict.

    Keys: model, version, run_id, model_id, stage, git_commit, git_dirty, model_md5;
    `data` ({"data/<path>": md5} for every data set anywhere upstream) and `external`
    ({input name: md5} for inputs outside data/ that no run produced, e.g. a user's base
    model), both from `data_lineage_tags`; `upstream_runs` (run ids, nearest first); `chain`
    (`lineage_chain(run)`: each run with its inputs' md5, path and producing run);
    `params` (the run's params); `metrics` ({"evaluation": the evaluate stage's metrics of
    this model, "run": the run's own last metric values}); and `extra`.
    """
    run_tags = run.data.tags
    data: dict[str, str] = {}
    external: dict[str, str] = {}
    for key, md5 in data_lineage_tags(chain, project_root).items():
        location = key.removeprefix("lineage.").removesuffix(".md5")
        if location.startswith("external."):
            external[location.removeprefix("external.")] = md5
        else:  # "data.<path under data/>" or "data"
            data[location.replace(".", "/", 1)] = md5
    return {
        "model": name,
        "version": str(version),
        "run_id": run.info.run_id,
        "model_id": run_tags.get(f"model.{MODEL_ARTIFACT}.model_id"),
        "stage": run_tags.get("stage", run.info.run_name),
        "git_commit": run_tags.get("git_commit", UNKNOWN),
        "git_dirty": run_tags.get("git_dirty", UNKNOWN),
        "model_md5": run_tags.get(f"model.{MODEL_ARTIFACT}.md5"),
        "data": data,
        "external": external,
        "upstream_runs": [entry["run_id"] for entry in chain[1:]],
        "chain": chain,
        "params": dict(run.data.params),
        "metrics": {"evaluation": dict(metrics), "run": dict(run.data.metrics)},
        **(extra or {}),
    }


def version_lineage(client: MlflowClient, model_version: ModelVersion) -> dict[str, Any]:
    """The lineage file of a registered version (see `lineage_record`), read from its run.

    Raises ValueError for a version without the `lineage` tag (registered by hand, or by an
    older rlhf that put the lineage into tags).
    """
    import mlflow

    where = model_version.tags.get(LINEAGE_TAG)
    if not where:
        raise ValueError(
            f"{model_version.name} v{model_version.version} has no '{LINEAGE_TAG}' tag: it "
            "was not registered by register_candidate; register its run again to write one."
        )
    with tempfile.TemporaryDirectory(prefix="lineage-") as scratch:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=where, dst_path=scratch, tracking_uri=client.tracking_uri
        )
        return json.loads(Path(local).read_text(encoding="utf-8"))


def data_version(inputs: Mapping[str, Mapping[str, str]], project_root: Path) -> str:
    """A version's `data_version` tag, from its run's `inputs` (`lineage_chain` fields): the md5
    of the one input under data/, `name=md5` pairs for several, else unknown."""
    md5s = {
        name: fields["md5"]
        for name, fields in sorted(inputs.items())
        if fields.get("md5") and _data_location(fields.get("path"), project_root)
    }
    if len(md5s) == 1:
        return next(iter(md5s.values()))
    return " ".join(f"{name}={md5}" for name, md5 in md5s.items()) or UNKNOWN
