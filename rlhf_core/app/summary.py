"""What `rlhf run` prints at the end: the comparison of policies, the gate, where to look."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhf_core.paths import ProjectPaths

COLUMNS = (
    "gold_win_rate_vs_sft",
    "rm_win_rate_vs_sft",
    "gold_score_mean",
    "rm_score_mean",
    "kl_to_sft",
    "mean_length",
)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_summary(summary: dict[str, Any], root: Path = Path(".")) -> None:
    """Print the evaluation table, the gate's decision and the places to look next."""
    console = Console()
    paths = ProjectPaths(root)
    metrics_file = paths.metrics_file("evaluate")
    if metrics_file.is_file():
        evaluation = json.loads(metrics_file.read_text(encoding="utf-8"))
        table = Table(title="Held-out evaluation (win rates against the SFT model)")
        table.add_column("policy")
        for column in COLUMNS:
            table.add_column(column, justify="right")
        for policy, values in evaluation.items():
            if policy != "reward_model":
                table.add_row(policy, *(_cell(values.get(c)) for c in COLUMNS))
        console.print(table)
        reward = evaluation.get("reward_model", {})
        console.print(
            f"reward model: held-out accuracy {_cell(reward.get('eval_accuracy'))}, "
            f"annotator agreement (ceiling) {_cell(reward.get('annotator_agreement'))}"
        )
    gate = summary.get("gate") or {}
    if gate:
        console.print(f"gate: {gate.get('status')}")
        for reason in gate.get("reasons", []):
            console.print(f"  - {reason}")
    console.print(
        "Look next: `rlhf ui` (MLflow: runs, curves, registry and the champion), "
        "`dvc metrics show`, `dvc plots show`, "
        f"{paths.evaluation_dir / 'comparison.md'} and {paths.evaluation_dir / 'samples.md'}."
    )
