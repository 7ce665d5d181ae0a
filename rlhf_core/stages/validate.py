"""Stage `validate`: every raw set through Great Expectations into data/validated/<set>.

Each set gets report.json, valid.parquet and quarantine.jsonl (a reason per row) in its DVC
output, which depends only on the inputs and settings; the Data Docs (timestamped by GX) go
to artifacts/data_docs/<set> and to the stage's MLflow run, with the counts and the
quarantine reasons. The stage fails only when a set's valid fraction is below
data.validation.min_valid_fraction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from rlhf_core.config import Params
from rlhf_core.files import writing
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.datasets import data_set_files, set_kind

log = logging.getLogger(__name__)

STAGE = "validate"
SUMMARY_KEYS = (
    "total",
    "valid",
    "quarantined",
    "valid_fraction",
    "min_valid_fraction",
    "passed",
    "reasons",
)


def run_validate(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """Validate each set; write artifacts/metrics/validate.json and return it."""
    from rlhf_core.tracking.runs import stage_run

    paths = ProjectPaths(root)
    sets = data_set_files(params, paths)
    inputs = {
        f"{name}.{index}": file for name, files in sets.items() for index, file in enumerate(files)
    }
    if paths.base_model_dir.is_dir():
        inputs["base_model"] = paths.base_model_dir
    run_params = {
        "data": {
            "source": params.data.source,
            "validation": dataclasses.asdict(params.data.validation),
        }
    }
    with stage_run(
        STAGE, project_root=root, params=run_params, inputs=inputs, label=params.data.source
    ) as run:
        summary = _validate_sets(sets, params, paths, run)
        run.log_metrics(validation_metrics(summary), step=0)
        run.log_dict(summary, "validation/summary.json")
        run.record_output(paths.validated_dir)
    metrics_file = paths.metrics_dir / "validate.json"
    with writing("the validate metrics", metrics_file):
        paths.metrics_dir.mkdir(parents=True, exist_ok=True)
        metrics_file.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _validate_sets(sets: dict, params: Params, paths: ProjectPaths, run: Any) -> dict[str, Any]:
    from rlhf_core.data.validation import validate_files
    from rlhf_core.models.loading import load_tokenizer

    tokenizer = None
    if (paths.base_model_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(paths.base_model_dir))
    summary: dict[str, Any] = {"sets": {}}
    for name, files in sets.items():
        out = paths.validated_set(name)
        report = validate_files(
            [str(p) for p in files],
            set_kind(name),
            out,
            params.validation_for(set_kind(name)),
            tokenizer,
            docs_dir=paths.data_docs_dir(name),
            names_relative_to=paths.root,
        )
        summary["sets"][name] = {key: report[key] for key in SUMMARY_KEYS}
        summary["sets"][name]["warnings"] = [w["code"] for w in report.get("warnings", [])]
        if report["data_docs_index"]:
            run.log_artifacts(paths.data_docs_dir(name), f"data_docs/{name}")
        if report["quarantined"]:
            run.log_artifact(out / "quarantine.jsonl", f"quarantine/{name}")
        log.info("%s: %d/%d valid", name, report["valid"], report["total"])
    summary["passed"] = all(s["passed"] for s in summary["sets"].values())
    return summary


def validation_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of a validation summary: `<set>.total|valid|quarantined|valid_fraction`
    and `<set>.reason.<reason>` (quarantined rows per reason) for each set."""
    metrics: dict[str, float] = {}
    for name, counts in summary["sets"].items():
        for key in ("total", "valid", "quarantined", "valid_fraction"):
            metrics[f"{name}.{key}"] = float(counts[key])
        for reason, count in counts["reasons"].items():
            metrics[f"{name}.reason.{reason}"] = float(count)
    return metrics
