"""Tests of rlhf_core/evaluation/reward_trust.py: the reward model's accuracy interval, the
annotators' ceiling, calibration and accuracy by gold margin, on hand-computed cases and on
synthetic Bradley-Terry annotators whose label probabilities are known."""

import json
import math

import numpy as np
import pytest

from rlhf_core.data.gold import (
    bradley_terry_probability,
    expected_agreement,
    observed_agreement,
)
from rlhf_core.evaluation.metrics import wilson_interval
from rlhf_core.evaluation.reward_trust import (
    TRUST_KEYS,
    accuracy_by_gold_margin,
    annotator_ceiling,
    calibration_bins,
    expected_calibration_error,
    label_probability,
    pair_accuracy,
    pair_calibration,
    reward_trust_metrics,
)

TEMPERATURE = 0.2  # the demo's annotator temperature


def synthetic_pairs(pairs: int, seed: int, temperature: float = TEMPERATURE):
    """Demo-like pairs: gold scores in [-1, 1], a Bradley-Terry label per pair, and the pair
    ordered as the label says; returns (chosen gold, rejected gold)."""
    rng = np.random.default_rng(seed)
    first, second = rng.uniform(-1, 1, pairs), rng.uniform(-1, 1, pairs)
    first_wins = rng.random(pairs) < label_probability(first, second, temperature)
    return np.where(first_wins, first, second), np.where(first_wins, second, first)


# ---------------------------------------------------------------- accuracy and its interval
def test_wilson_interval_of_known_cases():
    # 8 of 10: centre (0.8 + 1.96²/20) / (1 + 1.96²/10) = 0.71674, half-width 0.22658.
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94332), abs=1e-5)
    # 0 of 10: the lower end is 0 and the upper z² / (n + z²) = 3.84146 / 13.84146.
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(3.841459 / 13.841459, abs=1e-6)
    assert wilson_interval(10, 10).high == pytest.approx(1.0)
    # Large n: close to the normal interval p ± 1.96 √(p(1 − p)/n).
    low, high = wilson_interval(8000, 10000)
    wald = 1.959964 * math.sqrt(0.8 * 0.2 / 10000)
    assert low == pytest.approx(0.8 - wald, abs=2e-4) and high == pytest.approx(
        0.8 + wald, abs=2e-4
    )


def test_wilson_interval_covers_the_true_accuracy_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, truth, repeats = 1000, 0.8, 2000
    covered = sum(
        low <= truth <= high
        for low, high in (
            wilson_interval(int(k), trials) for k in rng.binomial(trials, truth, repeats)
        )
    )
    assert abs(covered / repeats - 0.95) < 3 * math.sqrt(0.95 * 0.05 / repeats)


def test_pair_accuracy_counts_ties_wrong_and_carries_its_interval():
    accuracy = pair_accuracy([1.0, 2.0, 0.5, 3.0], [0.0, 2.0, 1.0, 1.0])
    assert accuracy.value == 0.5 and accuracy.pairs == 4
    assert (accuracy.low, accuracy.high) == wilson_interval(2, 4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: wilson_interval(3, 0), "trials"),
        (lambda: wilson_interval(11, 10), "successes"),
        (lambda: pair_accuracy([1.0, 2.0], [1.0]), "paired"),
        (lambda: pair_accuracy([], []), "empty"),
        (lambda: label_probability([0.1], [0.2], -1.0), "temperature"),
        (lambda: calibration_bins([1.5], [1.0]), r"\[0, 1\]"),
        (lambda: calibration_bins([0.5], [1.0], n_bins=0), "n_bins"),
        (lambda: expected_calibration_error([], "labels"), "no calibration bins"),
        (lambda: accuracy_by_gold_margin([1.0], [0.0], [1.0, 0.0], [0.0, 1.0], 0.2), "one of"),
    ],
)
def test_bad_inputs_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- the annotators' ceiling
def test_label_probability_and_ceiling_match_the_gold_module():
    chosen, rejected = synthetic_pairs(300, seed=1)
    chosen[:5] = rejected[:5]  # a few ties
    for temperature in (0.0, 0.05, TEMPERATURE, 3.0):
        q = label_probability(chosen, rejected, temperature)
        exact = [
            bradley_terry_probability(c, r, temperature)
            for c, r in zip(chosen, rejected, strict=True)
        ]
        assert q == pytest.approx(exact, abs=1e-12)
        ceiling = annotator_ceiling(chosen, rejected, temperature)
        assert ceiling.expected == pytest.approx(
            expected_agreement(list(chosen), list(rejected), temperature), abs=1e-12
        )
        assert ceiling.observed == observed_agreement(list(chosen), list(rejected))
    assert annotator_ceiling(chosen, rejected, None).expected is None


def test_observed_agreement_scatters_around_the_expected_ceiling():
    chosen, rejected = synthetic_pairs(20000, seed=2)
    ceiling = annotator_ceiling(chosen, rejected, TEMPERATURE)
    assert 0.8 < ceiling.expected < 0.95
    noise = math.sqrt(ceiling.expected * (1 - ceiling.expected) / 20000)
    assert abs(ceiling.observed - ceiling.expected) < 4 * noise


# ---------------------------------------------------------------- calibration
def test_ece_of_a_hand_computed_case():
    bins = calibration_bins([0.55, 0.65, 0.95, 0.95], [1.0, 0.0, 1.0, 1.0])
    assert [(b.low, b.pairs) for b in bins] == [(0.5, 1), (0.6, 1), (0.9, 2)]
    # ¼·|0.55 − 1| + ¼·|0.65 − 0| + ½·|0.95 − 1| = 0.1125 + 0.1625 + 0.025
    assert expected_calibration_error(bins) == pytest.approx(0.3)
    assert calibration_bins([1.0], [1.0])[0].low == 0.9  # 1 falls in the last bin
    with pytest.raises(ValueError, match="no gold"):
        expected_calibration_error(bins, "gold")


def test_a_pair_is_seen_from_the_reward_models_favourite():
    # Rewards prefer the rejected response: confidence σ(1), outcome 0 (the label disagrees),
    # exact probability 1 − q.
    calibration = pair_calibration([0.0], [1.0], gold_label_probability=[0.8])
    (only,) = calibration.bins
    assert only.confidence_mean == pytest.approx(1 / (1 + math.exp(-1)))
    assert only.label_agreement == 0.0
    assert only.gold_probability == pytest.approx(0.2)
    tie = pair_calibration([0.3], [0.3], gold_label_probability=[0.9]).bins[0]
    assert (tie.confidence_mean, tie.label_agreement, tie.gold_probability) == (0.5, 0.5, 0.5)


def test_a_calibrated_reward_model_has_ece_near_zero_and_a_scaled_one_does_not():
    """r = g / T is the annotators' own Bradley-Terry model: σ(r⁺ − r⁻) is exactly the label
    probability. Scaling the rewards by 3 makes the model overconfident, by ⅓ underconfident."""
    chosen, rejected = synthetic_pairs(20000, seed=3)
    q = label_probability(chosen, rejected, TEMPERATURE)
    calibrated = pair_calibration(chosen / TEMPERATURE, rejected / TEMPERATURE, q)
    assert calibrated.ece_vs_gold == pytest.approx(0.0, abs=1e-12)
    # Against the labels only sampling noise remains: each bin's share of agreeing labels
    # scatters by √(v_b / n_b) around its mean probability.
    noise = sum(
        b.pairs / 20000 * math.sqrt(b.gold_probability * (1 - b.gold_probability) / b.pairs)
        for b in calibrated.bins
    )
    assert calibrated.ece_vs_labels < 3 * noise < 0.02
    for scale in (3.0, 1 / 3):
        scaled = pair_calibration(scale * chosen / TEMPERATURE, scale * rejected / TEMPERATURE, q)
        assert scaled.ece_vs_gold > 0.05
        assert scaled.ece_vs_labels > calibrated.ece_vs_labels + 0.03
        assert abs(scaled.ece_vs_labels - scaled.ece_vs_gold) < 3 * noise


def test_ece_without_gold_is_none_and_the_label_version_still_works():
    chosen, rejected = synthetic_pairs(500, seed=4)
    calibration = pair_calibration(chosen / TEMPERATURE, rejected / TEMPERATURE)
    assert calibration.ece_vs_gold is None
    assert 0.0 <= calibration.ece_vs_labels < 0.1
    assert all(b.gold_probability is None for b in calibration.bins)
    assert all(b.low >= 0.5 for b in calibration.bins)  # top-label confidence is ≥ ½


# ---------------------------------------------------------------- accuracy by gold margin
def test_margin_buckets_of_a_hand_made_set():
    chosen_gold = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    rejected_gold = np.zeros(8)  # margins 0.1 … 0.8: two pairs per quartile bucket
    chosen_rewards = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    rejected_rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    buckets = accuracy_by_gold_margin(
        chosen_rewards, rejected_rewards, chosen_gold, rejected_gold, TEMPERATURE
    )
    assert [b.accuracy.pairs for b in buckets] == [2, 2, 2, 2]
    assert [b.accuracy.value for b in buckets] == [0.5, 0.5, 1.0, 1.0]
    edges = [edge for b in buckets for edge in (b.margin_low, b.margin_high)]
    assert edges == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    ceilings = [b.annotator_agreement_expected for b in buckets]
    assert ceilings[0] == pytest.approx(np.mean([1 / (1 + math.exp(-m / 0.2)) for m in (0.1, 0.2)]))
    assert ceilings == sorted(ceilings)  # clearer pairs, higher ceiling
    assert all(b.annotator_agreement == 1.0 for b in buckets)  # chosen always has more gold


def test_tied_margins_collapse_into_fewer_buckets():
    buckets = accuracy_by_gold_margin([1.0] * 6, [0.0] * 6, [0.5] * 6, [0.0] * 6, None)
    assert len(buckets) == 1 and buckets[0].accuracy.pairs == 6
    assert buckets[0].annotator_agreement_expected is None


def test_a_calibrated_model_reaches_the_ceiling_in_every_bucket():
    chosen, rejected = synthetic_pairs(20000, seed=5)
    buckets = accuracy_by_gold_margin(
        chosen / TEMPERATURE, rejected / TEMPERATURE, chosen, rejected, TEMPERATURE
    )
    assert len(buckets) == 4 and sum(b.accuracy.pairs for b in buckets) == 20000
    for bucket in buckets:
        # The model orders every pair as gold does, so its accuracy is the labels' agreement.
        assert bucket.accuracy.value == pytest.approx(bucket.annotator_agreement)
        expected = bucket.annotator_agreement_expected
        noise = math.sqrt(expected * (1 - expected) / bucket.accuracy.pairs)
        assert abs(bucket.accuracy.value - expected) < 4 * noise
    assert buckets[0].annotator_agreement_expected < 0.7 < 0.99 < buckets[-1].accuracy.value


# ---------------------------------------------------------------- everything together
def test_trust_metrics_hold_every_key_and_are_json():
    chosen, rejected = synthetic_pairs(400, seed=6)
    metrics = reward_trust_metrics(
        chosen / TEMPERATURE, rejected / TEMPERATURE, chosen, rejected, TEMPERATURE
    )
    assert tuple(metrics) == TRUST_KEYS
    assert metrics == json.loads(json.dumps(metrics))
    assert metrics["eval_pairs"] == 400
    assert metrics["eval_accuracy_ci_low"] <= metrics["eval_accuracy"]
    assert metrics["eval_accuracy"] <= metrics["eval_accuracy_ci_high"]
    assert metrics["eval_accuracy"] == metrics["annotator_agreement"]  # it orders as gold does
    assert metrics["rm_gold_agreement"] == 1.0
    assert metrics["ece_vs_gold"] == pytest.approx(0.0, abs=1e-12)
    assert set(metrics["gold_margin_buckets"]) == {"q1", "q2", "q3", "q4"}
    assert sum(b["pairs"] for b in metrics["calibration_bins"].values()) == 400
    assert all(name.startswith("bin_") for name in metrics["calibration_bins"])


def test_trust_metrics_without_gold_leave_the_gold_numbers_none():
    metrics = reward_trust_metrics([1.0, 0.0, 2.0], [0.0, 1.0, 0.5])
    assert metrics["eval_accuracy"] == pytest.approx(2 / 3)
    for key in ("annotator_agreement", "annotator_agreement_expected", "rm_gold_agreement"):
        assert metrics[key] is None
    assert metrics["ece_vs_gold"] is None and metrics["gold_margin_buckets"] == {}
    assert metrics["ece_vs_labels"] is not None
    with_gold = reward_trust_metrics([1.0, 0.0], [0.0, 1.0], [0.5, 0.2], [0.1, 0.4])
    assert with_gold["annotator_agreement"] == 0.5
    assert with_gold["rm_gold_agreement"] == 1.0
    assert with_gold["annotator_agreement_expected"] is None  # no temperature given
    assert with_gold["ece_vs_gold"] is None
