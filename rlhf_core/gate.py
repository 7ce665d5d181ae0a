"""The quality gate: may a newly trained policy replace the champion?

Pure decisions on numbers, no I/O. The input is the evaluate stage's metrics
(`artifacts/metrics/evaluate.json`):

    {"dpo": {"gold_win_rate_vs_sft": 0.71, "rm_win_rate_vs_sft": 0.68, "kl_to_sft": 3.1, ...},
     "ppo": {...},
     "reward_model": {"eval_accuracy": 0.72, ...}}

The gate checks, in order:
1. the reward model's held-out accuracy (every policy trained or judged with it depends on it);
2. each candidate policy's win rate over SFT, its KL to SFT and the share of its responses
   that ended (absolute thresholds); the best policy that passes all three is the candidate;
3. with a champion already registered, the candidate's head-to-head win rate against it.
With no champion yet, passing 1 and 2 is enough: the first candidate becomes the champion.

With `block_on_overoptimisation`, step 2 also reads each policy's training-stage metrics
(`artifacts/metrics/<policy>.json`, given as `stage_metrics`): a policy whose stage reports
the overoptimisation alarm (`overoptimisation/alarm` 1, see `evaluation.overoptimisation`)
fails.

With `min_human_win_rate`, step 3 also reads people's votes (`rlhf label`): once
`min_human_votes` votes compared the candidate with the champion (`human`, from
`evaluation.human_votes.head_to_head` on the runs that trained them), the people's win rate
must reach the threshold; with fewer votes the gate says so and decides without them.

`gold_*` metrics are null for user data without a gold judge; the gate then falls back to the
reward model's version of the metric and says so in its reasons and checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rlhf_core.config.gate import GateSettings, is_finite_number
from rlhf_core.evaluation.overoptimisation import ALARM_METRIC, FIRST_STEP_METRIC
from rlhf_core.evaluation.sanity import SANITY_METRIC

REWARD_MODEL_KEY = "reward_model"
KL_METRIC = "kl_to_sft"
ENDED_METRIC = "ended_fraction"
REWARD_ACCURACY_METRIC = "eval_accuracy"

Evaluation = Mapping[str, Mapping[str, Any]]
# Each policy's training-stage metrics (artifacts/metrics/<policy>.json), by policy name.
StageMetrics = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Check:
    """One threshold test: `value` against `threshold` with `comparison` (">=" or "<=")."""

    name: str  # e.g. "dpo.gold_win_rate_vs_sft"
    value: float | None  # None when the metric is missing or null
    threshold: float
    comparison: str
    fallback_from: str | None = None  # the metric this one stands in for, when it is a fallback

    @property
    def passed(self) -> bool:
        """Whether the value is known and on the right side of the threshold."""
        if self.value is None:
            return False
        if self.comparison == ">=":
            return self.value >= self.threshold
        return self.value <= self.threshold

    def sentence(self) -> str:
        """A human reason, e.g. "dpo: gold_win_rate_vs_sft 0.71 ≥ 0.60"."""
        subject, _, metric = self.name.partition(".")
        if self.value is None:
            return f"{subject}: {metric} is missing, so the check fails"
        symbol = {(">=", True): "≥", (">=", False): "<", ("<=", True): "≤", ("<=", False): ">"}[
            (self.comparison, self.passed)
        ]
        text = f"{subject}: {metric} {self.value:.2f} {symbol} {self.threshold:.2f}"
        if self.fallback_from is not None:
            text += f" ({self.fallback_from} is null, so {metric} stands in)"
        return text

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: value, threshold, comparison, passed, and fallback_from when used."""
        record: dict[str, Any] = {
            "value": self.value,
            "threshold": self.threshold,
            "comparison": self.comparison,
            "passed": self.passed,
        }
        if self.fallback_from is not None:
            record["fallback_from"] = self.fallback_from
        return record


@dataclass(frozen=True)
class CandidateSelection:
    """The best passing policy (or None), with every check made and a reason per policy."""

    candidate: str | None
    checks: list[Check] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


@dataclass
class GateDecision:
    """What the gate decided and why.

    Attributes:
        promote: whether the candidate should become the champion.
        candidate: the selected policy ("dpo", "ppo", ...) or None when none passed.
        reasons: one human sentence per check or step, in the order they were made.
        checks: every check by name, each `{"value", "threshold", "comparison", "passed"}`
            (plus `"fallback_from"` when a fallback metric stood in).
    """

    promote: bool
    candidate: str | None
    reasons: list[str]
    checks: dict[str, dict]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, as logged to MLflow (`gate.json`)."""
        return {
            "promote": self.promote,
            "candidate": self.candidate,
            "reasons": list(self.reasons),
            "checks": dict(self.checks),
        }


def policy_checks(
    evaluation: Evaluation,
    policy: str,
    settings: GateSettings,
    stage_metrics: StageMetrics | None = None,
) -> list[Check]:
    """The absolute checks of one policy: its `policy_metric` (or fallback), its KL to SFT and
    the share of its responses that ended (a policy that learned not to stop fails here), with
    `min_sanity_pass_fraction` its share of right answers to the sanity prompts, and with
    `block_on_overoptimisation` its training stage's overoptimisation alarm."""
    metrics = evaluation.get(policy) or {}
    metric_name, value = settings.policy_metric, _number(metrics.get(settings.policy_metric))
    fallback_from = None
    if value is None and settings.fallback_metric is not None:
        fallback_value = _number(metrics.get(settings.fallback_metric))
        if fallback_value is not None:
            metric_name, value = settings.fallback_metric, fallback_value
            fallback_from = settings.policy_metric
    checks = [
        Check(f"{policy}.{metric_name}", value, settings.min_policy_metric, ">=", fallback_from),
        Check(f"{policy}.{KL_METRIC}", _number(metrics.get(KL_METRIC)), settings.max_kl, "<="),
        Check(
            f"{policy}.{ENDED_METRIC}",
            _number(metrics.get(ENDED_METRIC)),
            settings.min_ended_fraction,
            ">=",
        ),
    ]
    if settings.min_sanity_pass_fraction is not None:
        checks.append(
            Check(
                f"{policy}.{SANITY_METRIC}",
                _number(metrics.get(SANITY_METRIC)),
                settings.min_sanity_pass_fraction,
                ">=",
            )
        )
    if settings.block_on_overoptimisation:
        alarm = overoptimisation_check(stage_metrics or {}, policy)
        if alarm is not None:
            checks.append(alarm)
    return checks


def overoptimisation_check(stage_metrics: StageMetrics, policy: str) -> Check | None:
    """`<policy>.overoptimisation/alarm` ≤ 0, or None when the policy's stage metrics carry no
    alarm (DPO watches no gold curve while it trains) or the alarm is off (no gold judge)."""
    value = (stage_metrics.get(policy) or {}).get(ALARM_METRIC)
    if value is None:
        return None
    return Check(f"{policy}.{ALARM_METRIC}", _number(value), 0.0, "<=")


def overoptimisation_reason(stage_metrics: StageMetrics, policy: str) -> str | None:
    """Why the alarm blocks or cannot block `policy`, in words; None when it has no alarm or
    the alarm stayed silent."""
    metrics = stage_metrics.get(policy) or {}
    if ALARM_METRIC not in metrics:
        return None
    if metrics[ALARM_METRIC] is None:
        return f"{policy}: no gold judge, so the overoptimisation alarm is off and does not block"
    if metrics[ALARM_METRIC] == 1:
        return (
            f"{policy}: the overoptimisation alarm fired at step {metrics.get(FIRST_STEP_METRIC)}"
            " (the reward-model score rose while the gold score fell), and "
            "gate.block_on_overoptimisation is on"
        )
    return None


def select_candidate(
    evaluation: Evaluation,
    settings: GateSettings,
    stage_metrics: StageMetrics | None = None,
) -> CandidateSelection:
    """The best of `settings.candidate_policies` by policy metric among those passing every
    absolute check; ties go to the policy listed first. Policies absent from the evaluation
    are skipped with a reason. `stage_metrics` are read only with `block_on_overoptimisation`."""
    checks: list[Check] = []
    reasons: list[str] = []
    passing: list[tuple[float, int, str]] = []
    for order, policy in enumerate(settings.candidate_policies):
        if policy not in evaluation:
            reasons.append(f"{policy}: not in the evaluation, so it cannot be the candidate")
            continue
        policy_ones = policy_checks(evaluation, policy, settings, stage_metrics)
        checks.extend(policy_ones)
        reasons.extend(check.sentence() for check in policy_ones)
        if settings.block_on_overoptimisation:
            alarm_reason = overoptimisation_reason(stage_metrics or {}, policy)
            if alarm_reason is not None:
                reasons.append(alarm_reason)
        if all(check.passed for check in policy_ones):
            metric_value = policy_ones[0].value
            passing.append((metric_value, -order, policy))
    if not passing:
        reasons.append("no policy passes the absolute thresholds")
        return CandidateSelection(None, checks, reasons)
    _, _, best = max(passing)
    if len(passing) > 1:
        reasons.append(f"{best} has the best policy metric of the passing policies")
    return CandidateSelection(best, checks, reasons)


def reward_model_check(evaluation: Evaluation, settings: GateSettings) -> Check:
    """The reward model's held-out accuracy against `settings.min_reward_accuracy`."""
    metrics = evaluation.get(REWARD_MODEL_KEY) or {}
    accuracy = _number(metrics.get(REWARD_ACCURACY_METRIC))
    return Check(
        f"{REWARD_MODEL_KEY}.{REWARD_ACCURACY_METRIC}",
        accuracy,
        settings.min_reward_accuracy,
        ">=",
    )


def decide(
    evaluation: Evaluation,
    settings: GateSettings,
    head_to_head_win_rate: float | None,
    has_champion: bool,
    stage_metrics: StageMetrics | None = None,
    human: Mapping[str, Any] | None = None,
) -> GateDecision:
    """Promote the candidate or not.

    promote = reward-model accuracy passes ∧ a candidate passes its absolute checks
              ∧ (no champion ∨ head-to-head win rate vs the champion ≥ min_win_rate_vs_champion)
              ∧ (human check off ∨ fewer than min_human_votes votes
                 ∨ people's win rate vs the champion ≥ min_human_win_rate).

    `human`: people's votes on the candidate against the champion, {"win_rate", "counted",
    "low", "high"} (`human_votes.HeadToHead`); None means no votes.

    `head_to_head_win_rate` is the candidate's win rate against the champion (ties half), as
    measured by `rlhf_core.evaluation.head_to_head`; with a champion, None fails the gate.
    `stage_metrics` (each policy's training-stage metrics) feed `block_on_overoptimisation`.
    """
    reward_check = reward_model_check(evaluation, settings)
    selection = select_candidate(evaluation, settings, stage_metrics)
    checks = [reward_check, *selection.checks]
    reasons = [reward_check.sentence(), *selection.reasons]
    promote = reward_check.passed and selection.candidate is not None
    if selection.candidate is not None and has_champion:
        versus = Check(
            f"{selection.candidate}.win_rate_vs_champion",
            _number(head_to_head_win_rate),
            settings.min_win_rate_vs_champion,
            ">=",
        )
        checks.append(versus)
        if versus.value is None:
            reasons.append(
                f"{selection.candidate}: no head-to-head win rate against the champion was "
                "measured, so it cannot replace the champion"
            )
        else:
            reasons.append(versus.sentence())
        promote = promote and versus.passed
        human_check = _human_check(selection.candidate, settings, human)
        if isinstance(human_check, Check):
            checks.append(human_check)
            reasons.append(human_check.sentence())
            promote = promote and human_check.passed
        elif human_check is not None:
            reasons.append(human_check)
    reasons.append(_verdict(promote, selection.candidate, reward_check.passed, has_champion))
    return GateDecision(
        promote=promote,
        candidate=selection.candidate,
        reasons=reasons,
        checks={check.name: check.as_dict() for check in checks},
    )


def _human_check(
    candidate: str, settings: GateSettings, human: Mapping[str, Any] | None
) -> Check | str | None:
    """The people's win-rate check once enough votes exist; else a sentence saying why it
    did not apply (None when the check is off)."""
    if settings.min_human_win_rate is None:
        return None
    counted = int((human or {}).get("counted") or 0)
    if counted < settings.min_human_votes:
        return (
            f"{candidate}: {counted} people's vote(s) compared it with the champion in "
            f"`rlhf label`, fewer than gate.min_human_votes ({settings.min_human_votes}), so "
            "their win rate is not required yet"
        )
    return Check(
        f"{candidate}.human_win_rate_vs_champion",
        _number((human or {}).get("win_rate")),
        settings.min_human_win_rate,
        ">=",
    )


def _verdict(promote: bool, candidate: str | None, reward_ok: bool, has_champion: bool) -> str:
    if promote:
        how = "beats the champion" if has_champion else "becomes the first champion"
        return f"promote {candidate}: it passes every threshold and {how}"
    keep = "keep the champion" if has_champion else "no champion yet"
    if candidate is None:
        return f"do not promote ({keep}): no policy passes the absolute thresholds"
    if not reward_ok:
        return f"do not promote {candidate} ({keep}): the reward model is not accurate enough"
    return f"do not promote {candidate} ({keep}): it does not beat the champion head to head"


def _number(value: Any) -> float | None:
    """A finite float, or None for null, NaN, infinities and non-numbers."""
    return float(value) if is_finite_number(value) else None
