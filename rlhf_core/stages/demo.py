"""`rlhf demo`: the pipeline on the embedded offline demo, with a summary and where to look."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhf_core.config import Params
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.prepare import run_prepare
from rlhf_core.stages.validate import run_validate


def run_demo(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """Run the stages that exist so far in order and print a summary table."""
    console = Console()
    started = time.perf_counter()
    with console.status("prepare: demo data, tokenizer and base model"):
        prepared = run_prepare(params, root)
    console.print(
        f"prepare: base model with {prepared['base_model']['parameters']:,} parameters "
        f"in {prepared['seconds']} s"
    )
    with console.status("validate: Great Expectations on every data set"):
        validated = run_validate(params, root)
    table = Table(title="Validated data sets")
    for column in ("set", "total", "valid", "quarantined", "reasons", "warnings"):
        table.add_column(column)
    for name, report in validated["sets"].items():
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(report["reasons"].items())) or "-"
        table.add_row(
            name,
            str(report["total"]),
            str(report["valid"]),
            str(report["quarantined"]),
            reasons,
            ", ".join(report["warnings"]) or "-",
        )
    console.print(table)
    paths = ProjectPaths(root)
    console.print(
        f"done in {time.perf_counter() - started:.1f} s. Look at: {paths.raw_dir}/demo_meta.json "
        f"(annotator agreement ceiling), {paths.validated_dir}/<set>/report.json and "
        f"data_docs/, {paths.base_model_dir} (base model), {paths.metrics_dir}."
    )
    return {"prepare": prepared, "validate": validated, "passed": validated["passed"]}
