"""How far to trust the reward model: its held-out accuracy with an interval, the ceiling the
annotators' noise allows, its calibration, and its accuracy by how clear the pair is.

Pure numpy functions of the reward model's scores of held-out (chosen, rejected) pairs and,
on the demo task, of the gold judge's scores of the same responses. The annotators of the
demo are Bradley-Terry coins with a known temperature T on gold scores, so the probability
of every label is known exactly and the reward model's predicted probabilities can be
checked against it, not only against the noisy labels. The evaluate stage scores the pairs
and calls `reward_trust_metrics`; numbers that need gold scores are None without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhf_core.evaluation.metrics import _as_pair, wilson_interval

CALIBRATION_BINS = 10
MARGIN_BUCKETS = 4
# The keys of `reward_trust_metrics`, in the order a report shows them.
TRUST_KEYS = (
    "eval_pairs",
    "eval_accuracy",
    "eval_accuracy_ci_low",
    "eval_accuracy_ci_high",
    "eval_margin_mean",
    "annotator_agreement",
    "annotator_agreement_expected",
    "rm_gold_agreement",
    "ece_vs_labels",
    "ece_vs_gold",
    "calibration_bins",
    "gold_margin_buckets",
)


def sigmoid(values: Any) -> np.ndarray:
    """Logistic function 1 / (1 + exp(−x)) elementwise, as ½(1 + tanh(x/2)): no overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(values, dtype=np.float64)))


def _outcomes(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """1 where first > second, ½ on a tie, 0 where first < second."""
    return np.where(first > second, 1.0, np.where(first == second, 0.5, 0.0))


# --------------------------------------------------------------------------------------------
# Accuracy and its interval
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accuracy:
    """Share of pairs whose chosen response the reward model scores higher, with its interval."""

    value: float
    low: float
    high: float
    pairs: int


def pair_accuracy(chosen_rewards: Any, rejected_rewards: Any) -> Accuracy:
    """Accuracy = (1/N) Σ 1[r⁺ > r⁻] (a tie counts wrong, as in `reward_accuracy`), with its
    95% Wilson interval (`wilson_interval`): pairs are independent draws, so the count of
    correct pairs is binomial."""
    chosen, rejected = _as_pair(chosen_rewards, rejected_rewards, ("chosen", "rejected"))
    correct = int(np.sum(chosen > rejected))
    low, high = wilson_interval(correct, chosen.size)
    return Accuracy(correct / chosen.size, low, high, chosen.size)


# --------------------------------------------------------------------------------------------
# The annotators' ceiling
# --------------------------------------------------------------------------------------------


def label_probability(chosen_gold: Any, rejected_gold: Any, temperature: float) -> np.ndarray:
    """(pairs,) q = P(an annotator prefers the first response) = σ((g⁺ − g⁻)/T).

    The Bradley-Terry label of the demo's annotators (`gold.bradley_terry_probability`;
    Bradley & Terry 1952); at T = 0 the annotator is noiseless: 1, 0, or ½ on a tie.
    """
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(
            f"annotator temperature must be a finite number >= 0 but is {temperature!r}."
        )
    chosen, rejected = _as_pair(chosen_gold, rejected_gold, ("chosen_gold", "rejected_gold"))
    if temperature == 0:
        return _outcomes(chosen, rejected)
    return sigmoid((chosen - rejected) / temperature)


@dataclass(frozen=True)
class AnnotatorCeiling:
    """How often the labels agree with the gold order: expected (None without T) and observed."""

    expected: float | None
    observed: float


def annotator_ceiling(
    chosen_gold: Any, rejected_gold: Any, temperature: float | None
) -> AnnotatorCeiling:
    """The accuracy a reward model can expect on these labels, and how often they agree with gold.

    expected = (1/N) Σ σ(|g⁺ − g⁻|/T) = mean of max(q, 1 − q): given the pair, the label is a
    coin with P = q whatever else is known, so the best any model can do is to predict the
    gold order, right with probability max(q, 1 − q) (`gold.expected_agreement`).
    observed = (1/N) Σ (1[g⁺ > g⁻] + ½·1[g⁺ = g⁻]), the share of these labels that agree with
    gold (`gold.observed_agreement`); it scatters around `expected` by sampling noise.
    """
    chosen, rejected = _as_pair(chosen_gold, rejected_gold, ("chosen_gold", "rejected_gold"))
    expected = None
    if temperature is not None:
        q = label_probability(chosen, rejected, temperature)
        expected = float(np.mean(np.maximum(q, 1.0 - q)))
    return AnnotatorCeiling(expected, float(np.mean(_outcomes(chosen, rejected))))


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of a reliability diagram: confidences in [low, high) and what happened there."""

    low: float
    high: float
    pairs: int
    confidence_mean: float  # mean predicted probability that the favourite is preferred
    label_agreement: float  # share of labels that prefer the favourite (tie ½)
    gold_probability: float | None  # mean exact probability of that label (demo only)


def calibration_bins(
    confidence: Any,
    outcome: Any,
    probability: Any = None,
    n_bins: int = CALIBRATION_BINS,
) -> list[CalibrationBin]:
    """The non-empty bins of `n_bins` equal-width bins of [0, 1] over `confidence`.

    Bin m holds the confidences in [m/M, (m + 1)/M) (the last also holds 1). Each bin gives
    its mean confidence, mean `outcome` (0/1 or ½ per item) and, with `probability`, the mean
    exact probability of the outcome. Equal-width bins as in Guo et al. 2017, "On Calibration
    of Modern Neural Networks" (arXiv:1706.04599, §2).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer but is {n_bins!r}.")
    confidence, outcome = _as_pair(confidence, outcome, ("confidence", "outcome"))
    if probability is not None:
        probability, _ = _as_pair(probability, confidence, ("probability", "confidence"))
    if np.any((confidence < 0) | (confidence > 1)):
        raise ValueError("confidence must lie in [0, 1]; pass probabilities, not rewards.")
    index = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)  # (items,)
    bins = []
    for m in np.unique(index):
        members = index == m
        bins.append(
            CalibrationBin(
                low=m / n_bins,
                high=(m + 1) / n_bins,
                pairs=int(members.sum()),
                confidence_mean=float(confidence[members].mean()),
                label_agreement=float(outcome[members].mean()),
                gold_probability=None
                if probability is None
                else float(probability[members].mean()),
            )
        )
    return bins


def expected_calibration_error(bins: list[CalibrationBin], against: str = "labels") -> float:
    """ECE = Σ_b (n_b/N) |mean confidence_b − mean target_b| over the bins (Guo et al. 2017,
    arXiv:1706.04599, eq. 3), with target the labels' outcome (`against="labels"`) or the
    exact probability of the label (`against="gold"`, the demo's annotator model).

    Against labels, ECE is positive even for a calibrated model: each bin's label share
    scatters by about √(q(1 − q)/n_b) around its probability. Against the exact probability
    there is no label noise, so it is ≈ 0 for a calibrated model whatever N is.
    """
    if against not in ("labels", "gold"):
        raise ValueError(f"against must be 'labels' or 'gold' but is {against!r}.")
    if not bins:
        raise ValueError("no calibration bins: the ECE of no pairs is undefined.")
    total = sum(b.pairs for b in bins)
    gaps = []
    for b in bins:
        target = b.label_agreement if against == "labels" else b.gold_probability
        if target is None:
            raise ValueError("the bins hold no gold probabilities; use against='labels'.")
        gaps.append(b.pairs / total * abs(b.confidence_mean - target))
    return float(sum(gaps))


@dataclass(frozen=True)
class PairCalibration:
    """The reward model's calibration on pairs: reliability bins and both ECEs."""

    bins: list[CalibrationBin]
    ece_vs_labels: float
    ece_vs_gold: float | None


def pair_calibration(
    chosen_rewards: Any,
    rejected_rewards: Any,
    gold_label_probability: Any = None,
    n_bins: int = CALIBRATION_BINS,
) -> PairCalibration:
    """Is p = σ(r⁺ − r⁻), the reward model's Bradley-Terry probability that chosen wins, right?

    The top-label convention of Guo et al. 2017 (arXiv:1706.04599): each pair is seen from
    the reward model's favourite, with confidence c = max(p, 1 − p) in [½, 1]; its outcome is
    1 when the annotator's label agrees with the favourite (0 when not, ½ on a reward tie), and
    its exact probability is q (or 1 − q when the favourite is the rejected response, ½ on a
    tie), q = σ((g⁺ − g⁻)/T) from `label_probability`. Seen from the chosen side instead, every
    label would say "chosen" and the empirical frequency would be 1 whatever p is. Binning c in
    10 equal bins of [0, 1] fills only the upper five; it is the same as binning p and 1 − p of
    both orientations of every pair in 10 bins of [0, 1], a reliability diagram symmetric
    about (½, ½).

    Args:
        chosen_rewards, rejected_rewards: (pairs,) reward-model scores.
        gold_label_probability: (pairs,) q per pair, or None without a gold judge.
    """
    chosen, rejected = _as_pair(chosen_rewards, rejected_rewards, ("chosen", "rejected"))
    p = sigmoid(chosen - rejected)  # (pairs,) P(chosen ≻ rejected) by the reward model
    favourite = np.sign(chosen - rejected)  # +1 chosen, −1 rejected, 0 tie
    confidence = np.maximum(p, 1.0 - p)
    outcome = 0.5 * (1.0 + favourite)  # the label always says "chosen"
    probability = None
    if gold_label_probability is not None:
        q, _ = _as_pair(gold_label_probability, chosen, ("gold_label_probability", "chosen"))
        probability = np.where(favourite > 0, q, np.where(favourite < 0, 1.0 - q, 0.5))
    bins = calibration_bins(confidence, outcome, probability, n_bins)
    return PairCalibration(
        bins=bins,
        ece_vs_labels=expected_calibration_error(bins, "labels"),
        ece_vs_gold=None if probability is None else expected_calibration_error(bins, "gold"),
    )


# --------------------------------------------------------------------------------------------
# Accuracy by how clear the pair is
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarginBucket:
    """Pairs whose gold margin |g⁺ − g⁻| lies in [margin_low, margin_high]."""

    margin_low: float
    margin_high: float
    accuracy: Accuracy
    annotator_agreement: float  # observed share of labels agreeing with gold
    annotator_agreement_expected: float | None  # the ceiling; None without T


def accuracy_by_gold_margin(
    chosen_rewards: Any,
    rejected_rewards: Any,
    chosen_gold: Any,
    rejected_gold: Any,
    temperature: float | None,
    n_buckets: int = MARGIN_BUCKETS,
) -> list[MarginBucket]:
    """Accuracy in quantile buckets of the gold margin |g⁺ − g⁻|, next to the ceiling there.

    Bucket edges are the 0, 1/K, …, 1 quantiles of the margins; a margin on an inner edge goes
    to the upper bucket, and buckets left empty by tied margins are dropped. Near-ties are
    coin flips for the annotators (ceiling ≈ ½), so a reward model's accuracy there says
    little; on clear pairs it should come close to the ceiling. A model that lags on clear
    pairs has learnt something other than the preference.
    """
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 1:
        raise ValueError(f"n_buckets must be a positive integer but is {n_buckets!r}.")
    chosen, rejected = _as_pair(chosen_rewards, rejected_rewards, ("chosen", "rejected"))
    chosen_g, rejected_g = _as_pair(chosen_gold, rejected_gold, ("chosen_gold", "rejected_gold"))
    if chosen_g.size != chosen.size:
        raise ValueError(
            f"{chosen.size} pairs of rewards but {chosen_g.size} of gold scores; give one of "
            "each per pair."
        )
    margins = np.abs(chosen_g - rejected_g)  # (pairs,)
    edges = np.quantile(margins, np.linspace(0.0, 1.0, n_buckets + 1))
    bucket_of = np.searchsorted(edges[1:-1], margins, side="right")  # (pairs,) in [0, K)
    buckets = []
    for bucket in np.unique(bucket_of):
        members = bucket_of == bucket
        ceiling = annotator_ceiling(chosen_g[members], rejected_g[members], temperature)
        buckets.append(
            MarginBucket(
                margin_low=float(margins[members].min()),
                margin_high=float(margins[members].max()),
                accuracy=pair_accuracy(chosen[members], rejected[members]),
                annotator_agreement=ceiling.observed,
                annotator_agreement_expected=ceiling.expected,
            )
        )
    return buckets


# --------------------------------------------------------------------------------------------
# Everything, as the evaluate stage reports it
# --------------------------------------------------------------------------------------------


def reward_trust_metrics(
    chosen_rewards: Any,
    rejected_rewards: Any,
    chosen_gold: Any = None,
    rejected_gold: Any = None,
    temperature: float | None = None,
    *,
    n_bins: int = CALIBRATION_BINS,
    n_buckets: int = MARGIN_BUCKETS,
) -> dict[str, Any]:
    """The reward model's trust numbers on held-out pairs, JSON-ready.

    Keys: eval_pairs, eval_accuracy (+ _ci_low/_ci_high, 95% Wilson), eval_margin_mean
    (mean r⁺ − r⁻), annotator_agreement (labels vs gold, observed), annotator_agreement_expected
    (the ceiling, `annotator_ceiling`), rm_gold_agreement (share of pairs the reward model
    orders as gold does, tie ½: it can exceed the ceiling, which bounds agreement with the
    noisy labels), ece_vs_labels, ece_vs_gold (`pair_calibration`), calibration_bins
    ({"bin_<m>": ...}) and gold_margin_buckets ({"q<k>": ...}, `accuracy_by_gold_margin`).
    Without gold scores the gold numbers are None and there are no buckets; without the
    annotator temperature, the expected ceiling and ece_vs_gold are None.
    """
    chosen, rejected = _as_pair(chosen_rewards, rejected_rewards, ("chosen", "rejected"))
    accuracy = pair_accuracy(chosen, rejected)
    has_gold = chosen_gold is not None and rejected_gold is not None
    q = None
    if has_gold and temperature is not None:
        q = label_probability(chosen_gold, rejected_gold, temperature)
    calibration = pair_calibration(chosen, rejected, q, n_bins)
    metrics: dict[str, Any] = {
        "eval_pairs": accuracy.pairs,
        "eval_accuracy": accuracy.value,
        "eval_accuracy_ci_low": accuracy.low,
        "eval_accuracy_ci_high": accuracy.high,
        "eval_margin_mean": float(np.mean(chosen - rejected)),
        "annotator_agreement": None,
        "annotator_agreement_expected": None,
        "rm_gold_agreement": None,
        "ece_vs_labels": calibration.ece_vs_labels,
        "ece_vs_gold": calibration.ece_vs_gold,
        "calibration_bins": {
            f"bin_{round(b.low * n_bins)}": {
                "low": b.low,
                "high": b.high,
                "pairs": b.pairs,
                "confidence_mean": b.confidence_mean,
                "label_agreement": b.label_agreement,
                "gold_probability": b.gold_probability,
            }
            for b in calibration.bins
        },
        "gold_margin_buckets": {},
    }
    if not has_gold:
        return metrics
    chosen_g, rejected_g = _as_pair(chosen_gold, rejected_gold, ("chosen_gold", "rejected_gold"))
    ceiling = annotator_ceiling(chosen_g, rejected_g, temperature)
    metrics["annotator_agreement"] = ceiling.observed
    metrics["annotator_agreement_expected"] = ceiling.expected
    rm_direction = np.sign(chosen - rejected)
    gold_direction = np.sign(chosen_g - rejected_g)
    metrics["rm_gold_agreement"] = float(
        np.mean(np.where(rm_direction * gold_direction == 0, 0.5, rm_direction == gold_direction))
    )
    buckets = accuracy_by_gold_margin(
        chosen, rejected, chosen_g, rejected_g, temperature, n_buckets
    )
    metrics["gold_margin_buckets"] = {
        f"q{index + 1}": {
            "margin_low": bucket.margin_low,
            "margin_high": bucket.margin_high,
            "pairs": bucket.accuracy.pairs,
            "accuracy": bucket.accuracy.value,
            "accuracy_ci_low": bucket.accuracy.low,
            "accuracy_ci_high": bucket.accuracy.high,
            "annotator_agreement": bucket.annotator_agreement,
            "annotator_agreement_expected": bucket.annotator_agreement_expected,
        }
        for index, bucket in enumerate(buckets)
    }
    return metrics
