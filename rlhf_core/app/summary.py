"""What `rlhf run` prints at the end: the comparison of policies, the gate, where to look."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhf_core.evaluation.human_votes import win_rates_line
from rlhf_core.evaluation.overoptimisation import (
    ALARM_METRIC,
    NO_GOLD,
    STATUS_METRIC,
    overoptimisation_warning,
)
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


def overoptimisation_line(ppo_metrics: dict[str, Any]) -> str | None:
    """A warning when PPO's overoptimisation alarm fired, a note when it was off (no gold
    judge and no held-out reward model), None when it stayed silent or the metrics predate
    it."""
    if (warning := overoptimisation_warning(ppo_metrics)) is not None:
        return f"warning: ppo: {warning}"
    if ALARM_METRIC in ppo_metrics and ppo_metrics.get(STATUS_METRIC) == NO_GOLD:
        return (
            f"ppo: {NO_GOLD}; set reward.judge.enabled: true to train a held-out reward model "
            "on a disjoint split as the gold judge's stand-in"
        )
    return None


def print_summary(summary: dict[str, Any], root: Path = Path(".")) -> None:
    """Print the evaluation table, PPO's overoptimisation alarm, the gate's decision and the
    places to look next."""
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
    ppo_file = paths.metrics_file("ppo")
    if ppo_file.is_file():
        line = overoptimisation_line(json.loads(ppo_file.read_text(encoding="utf-8")))
        if line is not None:
            console.print(line, style="bold yellow" if line.startswith("warning") else None)
    gate = summary.get("gate") or {}
    if gate.get("candidate") and metrics_file.is_file():
        candidate = gate["candidate"]
        console.print(win_rates_line(candidate, evaluation.get(candidate) or {}, gate.get("human")))
    if gate:
        console.print(f"gate: {gate.get('status')}")
        for reason in gate.get("reasons", []):
            console.print(f"  - {reason}")
    console.print(
        "Look next: `rlhf ui` (MLflow: runs, curves, registry and the champion), "
        "`dvc metrics show`, `dvc plots show`, "
        f"{paths.evaluation_dir / 'comparison.md'} and {paths.evaluation_dir / 'samples.md'}."
    )
