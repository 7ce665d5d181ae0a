"""Tests for rlhf_core/evaluation/metrics.py: hand-computed values and independent references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from rlhf_core.evaluation.metrics import (
    POLICY_SUMMARY_KEYS,
    KLEstimate,
    best_of_n_kl,
    best_of_n_select,
    bootstrap_ci,
    distinct_n,
    kl_from_logprob_sums,
    mean_length,
    mean_token_length,
    summarise_policy,
    win_indicators,
    win_rate,
)

# --------------------------------------------------------------------------------------------
# win_rate
# --------------------------------------------------------------------------------------------


def test_win_rate_by_hand_with_a_tie():
    # item 0: win, item 1: tie, item 2: loss, item 3: win -> (1 + 0.5 + 0 + 1) / 4
    assert win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 3.0, 4.0]) == pytest.approx(0.625)
    assert win_indicators([3.0, 1.0, 2.0], [1.0, 1.0, 3.0]).tolist() == [1.0, 0.5, 0.0]


def test_win_rate_matches_a_loop_reference():
    rng = np.random.default_rng(1)
    scores_a = rng.integers(0, 4, size=200)  # few distinct values, so many ties
    scores_b = rng.integers(0, 4, size=200)
    points = 0.0
    for a, b in zip(scores_a.tolist(), scores_b.tolist(), strict=True):
        if a > b:
            points += 1.0
        elif a == b:
            points += 0.5
    assert win_rate(scores_a, scores_b) == pytest.approx(points / 200)


def test_win_rate_is_complementary_and_half_against_itself():
    rng = np.random.default_rng(2)
    scores_a, scores_b = rng.normal(size=50), np.round(rng.normal(size=50), 1)
    assert win_rate(scores_a, scores_b) + win_rate(scores_b, scores_a) == pytest.approx(1.0)
    assert win_rate(scores_a, scores_a) == 0.5


def test_win_rate_accepts_tensors():
    assert win_rate(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("scores_a", "scores_b", "message"),
    [
        ([1.0, 2.0], [1.0], "paired"),
        ([], [], "empty"),
        ([1.0, float("nan")], [0.0, 0.0], "NaN"),
        ([[1.0]], [[0.0]], "1-D"),
    ],
)
def test_win_rate_rejects_bad_inputs(scores_a, scores_b, message):
    with pytest.raises(ValueError, match=message):
        win_rate(scores_a, scores_b)


# --------------------------------------------------------------------------------------------
# distinct_n and lengths
# --------------------------------------------------------------------------------------------


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the  cat\tran\n"]
    # unigrams: the cat sat the cat ran -> 4 distinct of 6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 distinct of 4
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 3) == pytest.approx(1.0)
    assert distinct_n(texts, 4) == 0.0  # no text has 4 words


def test_distinct_n_does_not_join_texts():
    # joined, "a a" would be one bigram; each text alone has none
    assert distinct_n(["a", "a"], 2) == 0.0
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["great great great great"], 1) == pytest.approx(1 / 4)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_distinct_n_rejects_bad_n(n):
    with pytest.raises(ValueError, match="positive integer"):
        distinct_n(["a b"], n)


def test_mean_length_in_words_and_chars():
    texts = ["one two three", "four", " five  six "]
    assert mean_length(texts) == pytest.approx((3 + 1 + 2) / 3)
    assert mean_length(texts, unit="chars") == pytest.approx((13 + 4 + 11) / 3)
    with pytest.raises(ValueError, match="unit"):
        mean_length(texts, unit="tokens")
    with pytest.raises(ValueError, match="empty"):
        mean_length([])


def test_mean_token_length_accepts_lists_and_tensors():
    assert mean_token_length([[1, 2, 3], [4]]) == pytest.approx(2.0)
    assert mean_token_length([torch.tensor([5, 6]), np.array([7, 8, 9, 10])]) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="empty"):
        mean_token_length([])


# --------------------------------------------------------------------------------------------
# best-of-n
# --------------------------------------------------------------------------------------------


def test_best_of_n_kl_is_zero_at_one_and_increases():
    assert best_of_n_kl(1) == 0.0
    values = [best_of_n_kl(n) for n in range(1, 65)]
    assert all(later > earlier for earlier, later in itertools.pairwise(values))
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 3 / 4)


def test_best_of_n_kl_bounds_the_exact_kl_of_a_discrete_policy():
    # Base policy: uniform over M responses with distinct rewards. Best-of-n picks the response
    # of reward rank k (1 = worst) with probability (k/M)^n - ((k-1)/M)^n.
    num_responses = 100_000
    ranks = np.arange(1, num_responses + 1) / num_responses
    for n in (2, 4, 16):
        best_of_n_probs = ranks**n - (ranks - 1 / num_responses) ** n
        exact = float(np.sum(best_of_n_probs * np.log(best_of_n_probs * num_responses)))
        assert exact <= best_of_n_kl(n)
        assert exact == pytest.approx(best_of_n_kl(n), abs=1e-3)  # M -> inf: the bound is tight


@pytest.mark.parametrize("n", [0, -3, 2.0])
def test_best_of_n_kl_rejects_bad_n(n):
    with pytest.raises(ValueError, match="positive integer"):
        best_of_n_kl(n)


def test_best_of_n_select_takes_the_first_maximum():
    scores = [[0.1, 0.5, 0.5], [2.0, 1.0, 0.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 3.0]]
    chosen = best_of_n_select(scores)
    assert chosen.tolist() == [1, 0, 0, 2]
    assert chosen.dtype == np.int64
    assert best_of_n_select(torch.tensor(scores)).tolist() == [1, 0, 0, 2]


@pytest.mark.parametrize("scores", [[1.0, 2.0], [[]], [[1.0, float("nan")]]])
def test_best_of_n_select_rejects_bad_shapes_and_nan(scores):
    with pytest.raises(ValueError, match="scores"):
        best_of_n_select(scores)


# --------------------------------------------------------------------------------------------
# KL estimate
# --------------------------------------------------------------------------------------------


def test_kl_estimate_by_hand():
    # log-ratios 0.5, 0.5, -1.0: mean 0; sample variance (0.25 + 0.25 + 1) / 2 = 0.75
    estimate = kl_from_logprob_sums([-1.0, -2.0, -3.0], [-1.5, -2.5, -2.0])
    assert isinstance(estimate, KLEstimate)
    assert estimate.mean == pytest.approx(0.0)
    assert estimate.stderr == pytest.approx(math.sqrt(0.75) / math.sqrt(3))
    assert estimate.num_samples == 3


def test_kl_estimate_of_one_sample_has_no_stderr():
    estimate = kl_from_logprob_sums(torch.tensor([-1.0]), torch.tensor([-3.0]))
    assert estimate.mean == pytest.approx(2.0)
    assert math.isnan(estimate.stderr)


def test_kl_estimate_recovers_a_known_gaussian_kl():
    # π = N(1, 1), π_ref = N(0, 1): KL(π ‖ π_ref) = 1/2.
    rng = np.random.default_rng(3)
    samples = rng.normal(loc=1.0, size=20_000)
    policy_logps = -0.5 * (samples - 1.0) ** 2
    reference_logps = -0.5 * samples**2  # the shared normaliser cancels in the ratio
    estimate = kl_from_logprob_sums(policy_logps, reference_logps)
    assert abs(estimate.mean - 0.5) < 4 * estimate.stderr
    assert estimate.stderr == pytest.approx(1 / math.sqrt(20_000), rel=0.05)  # var of ratio is 1


def test_kl_estimate_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="policy_logps has 2 values but reference_logps has 1"):
        kl_from_logprob_sums([-1.0, -2.0], [-1.0])


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_the_mean_and_is_seeded():
    values = np.random.default_rng(4).normal(loc=2.0, size=100)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high
    assert bootstrap_ci(values, seed=0) == (low, high)
    assert bootstrap_ci(values, seed=1) != (low, high)


def test_bootstrap_ci_narrows_with_more_data_and_lower_confidence():
    rng = np.random.default_rng(5)
    few, many = rng.random(50) < 0.6, rng.random(800) < 0.6  # win indicators

    def width(values, **kwargs):
        low, high = bootstrap_ci(values.astype(float), **kwargs)
        return high - low

    assert width(many) < width(few) / 2  # the width scales like 1/sqrt(n): 4x fewer -> ~2x
    assert width(few, alpha=0.5) < width(few, alpha=0.05)


def test_bootstrap_ci_uses_the_given_statistic():
    values = np.array([0.0] * 20 + [100.0] * 3)  # a resample's median is 0 unless 12 draw 100
    assert bootstrap_ci(values, stat=np.median) == (0.0, 0.0)
    assert bootstrap_ci(values).high > 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_boot": 0}, "n_boot"), ({"alpha": 1.0}, "alpha"), ({"alpha": 0.0}, "alpha")],
)
def test_bootstrap_ci_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci([1.0, 2.0], **kwargs)


# --------------------------------------------------------------------------------------------
# summarise_policy
# --------------------------------------------------------------------------------------------

SPEC_KEYS = set(POLICY_SUMMARY_KEYS)  # the report shows them in that order
CI_KEYS = {
    f"{name}_ci_{end}"
    for name in ("gold_win_rate_vs_sft", "rm_win_rate_vs_sft")
    for end in ("low", "high")
}


def _policy_inputs(num_prompts: int = 40) -> dict:
    rng = np.random.default_rng(6)
    words = ["good", "great", "film", "plot", "bad", "acting"]
    return {
        "gold_scores": rng.normal(0.3, 1.0, num_prompts),
        "rm_scores": rng.normal(0.5, 1.0, num_prompts),
        "sft_gold_scores": rng.normal(0.0, 1.0, num_prompts),
        "sft_rm_scores": rng.normal(0.0, 1.0, num_prompts),
        "texts": [" ".join(rng.choice(words, size=rng.integers(1, 8))) for _ in range(num_prompts)],
        "kl_to_sft": 1.25,
    }


def test_bootstrap_by_prompt_resamples_whole_groups():
    """Four samples of each of 5 prompts, equal within a prompt: resampling samples one by one
    treats 20 values as independent and gives a narrower interval than resampling the 5
    prompts, which is the honest one; with one sample per prompt both agree."""
    per_prompt = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    values = np.repeat(per_prompt, 4)
    prompts = np.repeat(np.arange(5), 4)
    by_sample = bootstrap_ci(values, seed=1)
    by_prompt = bootstrap_ci(values, seed=1, groups=prompts)
    assert by_prompt.high - by_prompt.low > 1.5 * (by_sample.high - by_sample.low)
    once = bootstrap_ci(per_prompt, seed=1, groups=np.arange(5))
    assert once == bootstrap_ci(per_prompt, seed=1)
    with pytest.raises(ValueError, match="one group per value"):
        bootstrap_ci(values, groups=prompts[:3])


def test_summarise_policy_matches_direct_computation():
    inputs = _policy_inputs()
    summary = summarise_policy(**inputs, n_boot=200)
    assert set(summary) == SPEC_KEYS | CI_KEYS
    assert summary["gold_score_mean"] == pytest.approx(inputs["gold_scores"].mean())
    assert summary["rm_score_mean"] == pytest.approx(inputs["rm_scores"].mean())
    assert summary["gold_win_rate_vs_sft"] == pytest.approx(
        win_rate(inputs["gold_scores"], inputs["sft_gold_scores"])
    )
    assert summary["rm_win_rate_vs_sft"] == pytest.approx(
        win_rate(inputs["rm_scores"], inputs["sft_rm_scores"])
    )
    assert summary["kl_to_sft"] == 1.25
    assert summary["mean_length"] == pytest.approx(
        np.mean([len(t.split()) for t in inputs["texts"]])
    )
    assert summary["distinct_1"] == pytest.approx(distinct_n(inputs["texts"], 1))
    assert summary["distinct_2"] == pytest.approx(distinct_n(inputs["texts"], 2))
    for name in ("gold_win_rate_vs_sft", "rm_win_rate_vs_sft"):
        assert summary[f"{name}_ci_low"] <= summary[name] <= summary[f"{name}_ci_high"]
        assert summary[f"{name}_ci_low"] < summary[f"{name}_ci_high"]
    assert all(isinstance(value, float) for value in summary.values())


def test_summarise_policy_without_ci_and_of_sft_itself():
    inputs = _policy_inputs()
    inputs["sft_gold_scores"] = inputs["gold_scores"]
    summary = summarise_policy(**inputs, with_ci=False)
    assert set(summary) == SPEC_KEYS
    assert summary["gold_win_rate_vs_sft"] == 0.5  # all ties


def test_summarise_policy_rejects_mismatched_inputs():
    inputs = _policy_inputs()
    inputs["texts"] = inputs["texts"][:-1]
    with pytest.raises(ValueError, match="one text per response"):
        summarise_policy(**inputs)
    inputs = _policy_inputs()
    inputs["sft_rm_scores"] = inputs["sft_rm_scores"][:-1]
    with pytest.raises(ValueError, match="rm_scores has 40 values but sft_rm_scores has 39"):
        summarise_policy(**inputs)
    inputs = _policy_inputs()
    inputs["kl_to_sft"] = float("nan")
    with pytest.raises(ValueError, match="kl_to_sft"):
        summarise_policy(**inputs)
