"""The evaluate stage's reports: the comparison table (markdown), sample responses, every
response with its scores, the reward-vs-KL plot, and their MLflow logging."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.evaluation.comparison import BEST_OF_N_PREFIX, REWARD_MODEL, PolicyResponses
from rlhf_core.evaluation.metrics import (
    POLICY_SUMMARY_KEYS,
)
from rlhf_core.files import write_json
from rlhf_core.paths import ProjectPaths

if TYPE_CHECKING:
    from rlhf_core.config.stages import EvaluateSettings
    from rlhf_core.generation import Messages
    from rlhf_core.tracking.runs import StageRun


log = logging.getLogger(__name__)

METRICS_NAME = "evaluate"  # artifacts/metrics/evaluate.json, the evaluate stage's metrics
# Columns of the comparison table, after the summary keys.
EXTRA_POLICY_KEYS = ("kl_to_sft_stderr", "ended_fraction")
CI_KEYS = tuple(
    f"{key}_ci_{end}"
    for key in ("gold_win_rate_vs_sft", "rm_win_rate_vs_sft")
    for end in ("low", "high")
)


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def policy_results(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-policy part of the results (everything but the reward model's block)."""
    return {name: metrics for name, metrics in results.items() if name != REWARD_MODEL}


def comparison_markdown(
    results: Mapping[str, Any], num_prompts: int, settings: EvaluateSettings
) -> str:
    """The comparison report: policies × metrics, win-rate intervals, the reward model."""
    from rlhf_core.evaluation.report import comparison_table_markdown

    policies = policy_results(results)
    samples = settings.samples_per_prompt
    parts = [
        f"# Evaluation on {num_prompts} held-out prompts, {samples} sample(s) per prompt\n",
        comparison_table_markdown(policies, [*POLICY_SUMMARY_KEYS, *EXTRA_POLICY_KEYS]),
        "Win rates pair each response with SFT's response of the same index to the same "
        "prompt; a tie counts ½, so SFT against itself is 0.5. KL to SFT is in nats: a "
        "Monte-Carlo estimate from the policy's own samples (± kl_to_sft_stderr), and for "
        f"{BEST_OF_N_PREFIX}<n> the analytic log n − (n − 1)/n, an upper bound. gold_* come "
        "from the demo's gold judge (– without one); ended_fraction is the share of responses "
        "that ended with EOS before the token limit.\n",
    ]
    if settings.bootstrap:
        parts += [
            "## 95% bootstrap intervals of the win rates\n",
            comparison_table_markdown(policies, list(CI_KEYS)),
        ]
    parts += [
        "## Reward model on the held-out preference pairs\n",
        _key_value_table(results[REWARD_MODEL]),
        "annotator_agreement is how often the held-out labels agree with the gold judge: the "
        "highest eval_accuracy a reward model can expect on them.\n",
    ]
    return "\n".join(parts)


def _key_value_table(values: Mapping[str, Any]) -> str:
    from rlhf_core.evaluation.report import format_value

    rows = [f"| {key} | {format_value(value)} |" for key, value in values.items()]
    return "\n".join(["| metric | value |", "| --- | ---: |", *rows]) + "\n"


def reward_vs_kl_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per policy, `{policy, kl_to_sft, gold_score_mean, rm_score_mean}`, for DVC plots."""
    return [
        {
            "policy": name,
            "kl_to_sft": metrics["kl_to_sft"],
            "gold_score_mean": metrics["gold_score_mean"],
            "rm_score_mean": metrics["rm_score_mean"],
        }
        for name, metrics in policy_results(results).items()
    ]


def response_rows(
    prompts: Sequence[Messages], responses: Mapping[str, PolicyResponses], samples_per_prompt: int
) -> list[dict[str, Any]]:
    """Every evaluated response with its scores: one row per policy and item."""
    from rlhf_core.evaluation.report import prompt_text

    rows = []
    for name, policy in responses.items():
        for item, text in enumerate(policy.texts):
            prompt_index, sample_index = divmod(item, samples_per_prompt)
            rows.append(
                {
                    "policy": name,
                    "prompt_index": prompt_index,
                    "sample_index": sample_index,
                    "prompt": prompt_text(prompts[prompt_index]),
                    "response": text,
                    "ended": policy.ended[item],
                    "rm_score": float(policy.rm_scores[item]),
                    "gold_score": None
                    if policy.gold_scores is None
                    else float(policy.gold_scores[item]),
                }
            )
    return rows


def write_reports(
    paths: ProjectPaths,
    results: Mapping[str, Any],
    prompts: Sequence[Messages],
    responses: Mapping[str, PolicyResponses],
    settings: EvaluateSettings,
    *,
    has_gold: bool,
) -> dict[str, Path]:
    """Write the metrics, reports and plots at their fixed paths; return them by name.

    Names: metrics, evaluation (folder: comparison.md, samples.md, responses.jsonl),
    reward_vs_kl_png, reward_vs_kl_json. The evaluation folder is rewritten from scratch.
    """
    import shutil

    from rlhf_core.evaluation.report import reward_vs_kl_figure, samples_markdown

    written = {"metrics": write_json(paths.metrics_file(METRICS_NAME), dict(results))}
    out = paths.evaluation_dir
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "comparison.md").write_text(
        comparison_markdown(results, len(prompts), settings), encoding="utf-8"
    )
    first_samples = range(
        0, len(prompts) * settings.samples_per_prompt, settings.samples_per_prompt
    )
    score_kind = "gold" if has_gold else "rm"
    score_name = "the gold judge" if has_gold else "the reward model"
    (out / "samples.md").write_text(
        f"# Sample responses (first sample per prompt; scores from {score_name})\n\n"
        + samples_markdown(
            prompts,
            {name: [policy.texts[i] for i in first_samples] for name, policy in responses.items()},
            {
                name: [float(getattr(policy, f"{score_kind}_scores")[i]) for i in first_samples]
                for name, policy in responses.items()
            },
            limit=settings.samples_in_report,
        ),
        encoding="utf-8",
    )
    with (out / "responses.jsonl").open("w", encoding="utf-8") as handle:
        for row in response_rows(prompts, responses, settings.samples_per_prompt):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    written["evaluation"] = out

    paths.plots_dir.mkdir(parents=True, exist_ok=True)
    figure = reward_vs_kl_figure(
        policy_results(results),
        y=f"{score_kind}_score_mean",
        title="Reward vs KL to SFT on held-out prompts",
    )
    written["reward_vs_kl_png"] = paths.plots_dir / "reward_vs_kl.png"
    figure.savefig(written["reward_vs_kl_png"], dpi=120)
    written["reward_vs_kl_json"] = write_json(
        paths.plots_dir / "reward_vs_kl.json", reward_vs_kl_rows(results)
    )
    return written


def log_to_run(run: StageRun, results: Mapping[str, Any], written: Mapping[str, Path]) -> None:
    """Log every number as `<policy>/<metric>` and the reports, plots and metrics as artifacts."""
    metrics = {
        f"{name}/{key}": value
        for name, block in results.items()
        for key, value in block.items()
        if isinstance(value, int | float) and math.isfinite(value)
    }
    run.log_metrics(metrics, step=0)
    run.log_artifacts(written["evaluation"], "evaluation")
    run.log_artifact(written["reward_vs_kl_png"], "plots")
    run.log_artifact(written["reward_vs_kl_json"], "plots")
    run.log_artifact(written["metrics"], "metrics")
