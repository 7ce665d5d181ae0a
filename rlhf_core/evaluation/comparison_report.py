"""The evaluate stage's reports: the comparison table (markdown), the reward model's section
(accuracy, ceiling, calibration, accuracy by gold margin, reliability diagram), sample
responses, every response with its scores, the reward-vs-KL plot, and their MLflow logging."""

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
    from matplotlib.figure import Figure

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
    parts.append(reward_model_markdown(results[REWARD_MODEL]))
    return "\n".join(parts)


RELIABILITY_PNG = "reward_model_reliability.png"  # in the evaluation folder
_BUCKET_COLUMNS = ("pairs", "accuracy", "accuracy_ci_low", "accuracy_ci_high")
_CEILING_COLUMNS = ("annotator_agreement", "annotator_agreement_expected")
_BIN_COLUMNS = ("pairs", "confidence_mean", "label_agreement", "gold_probability")


def reward_model_markdown(block: Mapping[str, Any]) -> str:
    """The "Reward model" section: its numbers, accuracy by gold-margin bucket next to the
    ceiling there, and the reliability table (with the diagram when there are pairs)."""
    from rlhf_core.evaluation.report import format_value

    scalars = {k: v for k, v in block.items() if not isinstance(v, Mapping)}
    parts = [
        f"## Reward model on {block['eval_pairs']} held-out pairs ({block['eval_set']})\n",
        _key_value_table(scalars),
        "eval_accuracy counts a pair right when r(chosen) > r(rejected); its 95% interval is "
        "Wilson's. annotator_agreement is how often the labels agree with the gold judge, and "
        "annotator_agreement_expected the same in expectation under the annotators' "
        "Bradley-Terry noise: the highest accuracy a reward model can expect on these labels "
        "(rm_gold_agreement, its agreement with gold itself, may exceed it). ece_vs_labels and "
        "ece_vs_gold are the expected calibration error (Guo et al. 2017, 10 equal-width bins "
        "of the confidence max(p, 1 − p), p = σ(r⁺ − r⁻)) against the labels and against the "
        "exact probability of each label (demo only; the label version carries sampling "
        "noise). Gold numbers are – without a gold judge.\n",
    ]
    buckets = block.get("gold_margin_buckets") or {}
    if buckets:
        rows = [
            f"| {name} | {format_value(b['margin_low'])}–{format_value(b['margin_high'])} | "
            + " | ".join(format_value(b[key]) for key in (*_BUCKET_COLUMNS, *_CEILING_COLUMNS))
            + " |"
            for name, b in buckets.items()
        ]
        header = ("bucket", "gold margin", *_BUCKET_COLUMNS, *_CEILING_COLUMNS)
        parts += [
            "### Accuracy by gold margin |g⁺ − g⁻| (quantile buckets)\n",
            "| " + " | ".join(header) + " |",
            "| --- | --- |" + " ---: |" * (len(header) - 2),
            *rows,
            "\nOn near-ties the annotators flip a coin (ceiling ≈ 0.5); on clear pairs a "
            "reward model that learnt the preference comes close to the ceiling.\n",
        ]
    bins = block.get("calibration_bins") or {}
    if bins:
        rows = [
            f"| {format_value(b['low'])}–{format_value(b['high'])} | "
            + " | ".join(format_value(b[key]) for key in _BIN_COLUMNS)
            + " |"
            for b in bins.values()
        ]
        header = ("confidence", *_BIN_COLUMNS)
        parts += [
            "### Reliability of the reward model's preference probability\n",
            "| " + " | ".join(header) + " |",
            "| --- |" + " ---: |" * (len(header) - 1),
            *rows,
            f"\n![reliability diagram]({RELIABILITY_PNG})\n",
        ]
    return "\n".join(parts)


def reliability_figure(block: Mapping[str, Any]) -> Figure:
    """Reliability diagram of the reward model: per confidence bin, the share of labels that
    agree with its favourite (marker area ∝ pairs) and, on the demo, the exact probability of
    that label, against the diagonal a calibrated model would follow."""
    from rlhf_core.evaluation.report import _new_figure, format_value

    bins = list((block.get("calibration_bins") or {}).values())
    if not bins:
        raise ValueError("the reward model block has no calibration bins to draw.")
    confidence = [b["confidence_mean"] for b in bins]
    figure, axes = _new_figure((5.0, 4.5))
    axes.plot([0.5, 1.0], [0.5, 1.0], linestyle="--", color="grey", label="calibrated")
    total = sum(b["pairs"] for b in bins)
    axes.scatter(
        confidence,
        [b["label_agreement"] for b in bins],
        s=[20 + 400 * b["pairs"] / total for b in bins],
        color="C0",
        alpha=0.7,
        label=f"label agreement (ECE {format_value(block.get('ece_vs_labels'))})",
    )
    if all(b["gold_probability"] is not None for b in bins):
        axes.plot(
            confidence,
            [b["gold_probability"] for b in bins],
            marker="o",
            color="C1",
            label=f"exact label probability (ECE {format_value(block.get('ece_vs_gold'))})",
        )
    axes.set_xlim(0.45, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("reward model confidence max(p, 1 − p), p = σ(r⁺ − r⁻)")
    axes.set_ylabel("share preferring the reward model's favourite")
    axes.set_title(f"Reward model reliability on {block['eval_pairs']} pairs")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    return figure


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

    Names: metrics, evaluation (folder: comparison.md, samples.md, responses.jsonl and, when
    the reward model was measured, reward_model_reliability.png), reward_vs_kl_png,
    reward_vs_kl_json. The evaluation folder is rewritten from scratch.
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
    if results[REWARD_MODEL].get("calibration_bins"):
        reliability_figure(results[REWARD_MODEL]).savefig(out / RELIABILITY_PNG, dpi=120)
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


def _numbers(prefix: str, value: Any) -> dict[str, float]:
    """Every finite number in `value`, nested dicts included, named `<prefix>/<key>/…`."""
    if isinstance(value, Mapping):
        return {
            name: number
            for key, inner in value.items()
            for name, number in _numbers(f"{prefix}/{key}", inner).items()
        }
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return {prefix: value}
    return {}


def log_to_run(run: StageRun, results: Mapping[str, Any], written: Mapping[str, Path]) -> None:
    """Log every number as `<policy>/<metric>` (nested blocks as `reward_model/<key>/<bucket>/
    <metric>`) and the reports, plots and metrics as artifacts (the reward model's reliability
    diagram with the evaluation folder)."""
    metrics = {
        name: number
        for block_name, block in results.items()
        for name, number in _numbers(block_name, block).items()
    }
    run.log_metrics(metrics, step=0)
    run.log_artifacts(written["evaluation"], "evaluation")
    run.log_artifact(written["reward_vs_kl_png"], "plots")
    run.log_artifact(written["reward_vs_kl_json"], "plots")
    run.log_artifact(written["metrics"], "metrics")
