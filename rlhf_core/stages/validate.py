"""Stage `validate`: every raw set through Great Expectations into data/validated/<set>.

Each set gets report.json, valid.parquet, quarantine.jsonl (a reason per row) and Data Docs.
The stage fails only when a set's valid fraction is below data.validation.min_valid_fraction.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rlhf_core.config import Params
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.datasets import data_set_files, set_kind

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("total", "valid", "quarantined", "valid_fraction", "passed", "reasons")


def run_validate(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """Validate each set; write artifacts/metrics/validate.json and return it."""
    from rlhf_core.data.validation import validate_files
    from rlhf_core.models.loading import load_tokenizer

    paths = ProjectPaths(root)
    tokenizer = None
    if (paths.base_model_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(paths.base_model_dir))
    summary: dict[str, Any] = {"sets": {}}
    for name, files in data_set_files(params, paths).items():
        out = paths.validated_set(name)
        report = validate_files(
            [str(p) for p in files], set_kind(name), out, params.data.validation, tokenizer
        )
        summary["sets"][name] = {key: report[key] for key in SUMMARY_KEYS}
        summary["sets"][name]["warnings"] = [w["code"] for w in report.get("warnings", [])]
        log.info("%s: %d/%d valid", name, report["valid"], report["total"])
    summary["passed"] = all(s["passed"] for s in summary["sets"].values())
    paths.metrics_dir.mkdir(parents=True, exist_ok=True)
    (paths.metrics_dir / "validate.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
