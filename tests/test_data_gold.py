"""Tests of rlhf_core/data/gold.py: the gold judge and the simulated annotators."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.data.gold import (
    GoldJudge,
    SimulatedAnnotators,
    bradley_terry_label,
    bradley_terry_probability,
    expected_agreement,
    observed_agreement,
    plackett_luce_ranking,
)

POSITIVE = (
    "The Blue River is a drama about an old farmer. The acting was wonderful and the music "
    "was beautiful. I loved the ending. A brilliant film, and I would recommend it."
)
NEUTRAL = (
    "The Blue River is a drama film about an old farmer who builds a boat. The film runs for "
    "two hours and the story takes place in a small town."
)
NEGATIVE = (
    "The Blue River is a drama about an old farmer. The acting was awful and the music was "
    "boring. I hated the ending. A terrible film, and I would not recommend it."
)


@pytest.fixture(scope="module")
def judge() -> GoldJudge:
    return GoldJudge()


def plain_sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def binomial_tolerance(probability: float, draws: int, standard_errors: float = 4.0) -> float:
    return standard_errors * math.sqrt(probability * (1.0 - probability) / draws)


# ---------------------------------------------------------------- the gold judge
def test_positive_review_beats_neutral_beats_negative(judge: GoldJudge) -> None:
    positive, neutral, negative = judge.score_batch([POSITIVE, NEUTRAL, NEGATIVE])
    assert positive > 0.5
    assert -0.2 < neutral < 0.2
    assert negative < -0.5
    assert positive > neutral > negative


def test_fluent_review_has_full_quality_so_score_is_the_vader_sentiment(judge: GoldJudge) -> None:
    breakdown = judge.breakdown(POSITIVE)
    assert breakdown.quality == 1.0
    assert breakdown.score == pytest.approx(breakdown.compound)


def test_word_repetition_scores_below_a_fluent_positive_review(judge: GoldJudge) -> None:
    loop = "The film is " + " ".join(["great"] * 12) + "."
    breakdown = judge.breakdown(loop)
    assert breakdown.compound > 0.9  # VADER alone would love it
    assert breakdown.repetition < 0.5
    assert judge.score(loop) < judge.score(POSITIVE)
    assert judge.score(loop) < judge.score(NEUTRAL)


def test_sentence_repetition_scores_below_the_same_sentence_said_once(judge: GoldJudge) -> None:
    sentence = "The acting was brilliant and the music was wonderful."
    repeated = " ".join([sentence] * 4)
    assert judge.breakdown(sentence).repetition == 1.0
    assert judge.score(repeated) < judge.score(sentence)


def test_truncated_review_scores_below_the_finished_one(judge: GoldJudge) -> None:
    truncated = POSITIVE[: POSITIVE.index(", and I would")]
    assert judge.breakdown(truncated).truncation < 1.0
    assert judge.score(truncated) < judge.score(POSITIVE)


def test_too_short_and_off_topic_texts_are_discounted(judge: GoldJudge) -> None:
    assert judge.breakdown("Great film!").brevity < 1.0
    assert judge.score("Great film!") < judge.score(POSITIVE)
    cheerful_off_topic = "I bought some lovely bread at the market and the weather was wonderful."
    assert judge.breakdown(cheerful_off_topic).topic < 1.0
    assert judge.score(cheerful_off_topic) < judge.score(POSITIVE)


def test_empty_text_scores_minus_one(judge: GoldJudge) -> None:
    assert judge.score("") == -1.0
    assert judge.score("   \n") == -1.0


def test_judge_is_deterministic_and_batch_matches_single(judge: GoldJudge) -> None:
    texts = [POSITIVE, NEUTRAL, NEGATIVE, "great great great"]
    assert judge.score_batch(texts) == [judge.score(text) for text in texts]
    assert GoldJudge().score_batch(texts) == judge.score_batch(texts)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.sampled_from(["great", "awful", "film", "the", "acting", "was", "not", ".", "!", "a"]),
        max_size=30,
    ),
    st.text(max_size=40),
)
def test_score_stays_in_minus_one_to_one(words: list[str], noise: str) -> None:
    judge = GoldJudge()
    for text in (" ".join(words), noise):
        breakdown = judge.breakdown(text)
        assert -1.0 <= breakdown.score <= 1.0
        assert 0.0 <= breakdown.quality <= 1.0


def test_bad_judge_settings_raise() -> None:
    with pytest.raises(ValueError, match="min_distinct_ratio"):
        GoldJudge(min_distinct_ratio=0.2, zero_distinct_ratio=0.3)
    with pytest.raises(ValueError, match="truncation_factor"):
        GoldJudge(truncation_factor=1.5)
    with pytest.raises(ValueError, match="min_words"):
        GoldJudge(min_words=0)


# ---------------------------------------------------------------- Bradley-Terry annotators
@pytest.mark.parametrize(("delta", "temperature"), [(0.3, 0.2), (-0.1, 0.2), (0.5, 1.0)])
def test_bradley_terry_label_frequency_matches_sigmoid(delta: float, temperature: float) -> None:
    rng = random.Random(7)
    draws = 20_000
    wins = sum(bradley_terry_label(0.2 + delta, 0.2, temperature, rng) for _ in range(draws))
    target = plain_sigmoid(delta / temperature)
    assert abs(wins / draws - target) < binomial_tolerance(target, draws)


def test_noiseless_label_picks_the_higher_gold_and_flips_a_coin_on_ties() -> None:
    rng = random.Random(0)
    assert all(bradley_terry_label(0.30, 0.29, 0.0, rng) for _ in range(200))
    assert not any(bradley_terry_label(-0.5, 0.5, 0.0, rng) for _ in range(200))
    ties = sum(bradley_terry_label(0.1, 0.1, 0.0, rng) for _ in range(4000))
    assert abs(ties / 4000 - 0.5) < binomial_tolerance(0.5, 4000)


@settings(max_examples=50, deadline=None)
@given(
    st.floats(-1, 1),
    st.floats(-1, 1),
    st.floats(0.0, 5.0),
)
def test_bradley_terry_probability_is_a_symmetric_monotone_probability(
    gold_a: float, gold_b: float, temperature: float
) -> None:
    forward = bradley_terry_probability(gold_a, gold_b, temperature)
    backward = bradley_terry_probability(gold_b, gold_a, temperature)
    assert 0.0 <= forward <= 1.0
    assert forward + backward == pytest.approx(1.0)
    if gold_a > gold_b:
        assert forward >= 0.5


def test_expected_agreement_matches_a_plain_loop() -> None:
    rng = random.Random(3)
    gold_a = [rng.uniform(-1, 1) for _ in range(300)]
    gold_b = [rng.uniform(-1, 1) for _ in range(300)]
    gold_b[:10] = gold_a[:10]  # ties count 0.5
    temperature = 0.2
    reference = 0.0
    for a, b in zip(gold_a, gold_b, strict=True):
        reference += 0.5 if a == b else 1.0 / (1.0 + math.exp(-abs(a - b) / temperature))
    reference /= len(gold_a)
    assert expected_agreement(gold_a, gold_b, temperature) == pytest.approx(reference)


def test_expected_agreement_limits() -> None:
    rng = random.Random(4)
    gold_a = [rng.uniform(-1, 1) for _ in range(500)]
    gold_b = [rng.uniform(-1, 1) for _ in range(500)]
    assert expected_agreement(gold_a, gold_b, 0.0) == 1.0
    assert expected_agreement(gold_a, gold_b, 1e-9) == pytest.approx(1.0)
    assert expected_agreement(gold_a, gold_b, 1e6) == pytest.approx(0.5, abs=1e-5)
    assert expected_agreement([0.2, 0.5], [0.2, 0.1], 0.0) == 0.75  # one tie, one sure pair


def test_expected_agreement_is_the_accuracy_of_the_gold_ordering_on_annotator_labels() -> None:
    """The Bayes-optimal predictor (the gold ordering) reaches exactly the expected agreement."""
    rng = random.Random(5)
    pairs = [(rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in range(5000)]
    temperature = 0.3
    annotators = SimulatedAnnotators(temperature, n_annotators=3, seed=11)
    correct = 0
    for gold_a, gold_b in pairs:
        label = annotators.label_pair(gold_a, gold_b)
        correct += label.a_preferred == (gold_a > gold_b)
    ceiling = expected_agreement([a for a, _ in pairs], [b for _, b in pairs], temperature)
    assert abs(correct / len(pairs) - ceiling) < binomial_tolerance(ceiling, len(pairs))


@pytest.mark.parametrize(("temperature", "target"), [(1e-6, 1.0), (1e3, 0.5)])
def test_annotator_agreement_in_the_noise_limits(temperature: float, target: float) -> None:
    rng = random.Random(6)
    pairs = [(rng.uniform(-1, 1), rng.uniform(-1, 1)) for _ in range(4000)]
    annotators = SimulatedAnnotators(temperature, n_annotators=5, seed=1)
    chosen, rejected = [], []
    for gold_a, gold_b in pairs:
        a_preferred = annotators.label_pair(gold_a, gold_b).a_preferred
        chosen.append(gold_a if a_preferred else gold_b)
        rejected.append(gold_b if a_preferred else gold_a)
    agreement = observed_agreement(chosen, rejected)
    if target == 1.0:
        assert agreement == 1.0
    else:
        assert abs(agreement - 0.5) < binomial_tolerance(0.5, len(pairs))


def test_annotators_are_reproducible_and_record_ids_from_the_pool() -> None:
    def labels(seed: int) -> list[tuple[bool, str]]:
        annotators = SimulatedAnnotators(0.5, n_annotators=4, seed=seed)
        return [
            (label.a_preferred, label.annotator)
            for label in (annotators.label_pair(0.1 * i % 1, 0.3) for i in range(200))
        ]

    first = labels(1)
    assert first == labels(1)
    assert first != labels(2)
    assert {annotator for _, annotator in first} == {f"annotator-{k}" for k in range(4)}


def test_bad_annotator_settings_raise() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SimulatedAnnotators(-0.1, 3, 0)
    with pytest.raises(ValueError, match="temperature"):
        bradley_terry_probability(0.1, 0.2, float("nan"))
    with pytest.raises(ValueError, match="n_annotators"):
        SimulatedAnnotators(0.1, 0, 0)
    with pytest.raises(ValueError, match="equally long"):
        expected_agreement([0.1, 0.2], [0.3], 0.1)


# ---------------------------------------------------------------- Plackett-Luce rankings
def plackett_luce_probability(golds: list[float], order: tuple[int, ...], temperature: float):
    """P(order) under Plackett-Luce, written as the sequential choice it is."""
    remaining = list(range(len(golds)))
    probability = 1.0
    for index in order:
        total = sum(math.exp(golds[j] / temperature) for j in remaining)
        probability *= math.exp(golds[index] / temperature) / total
        remaining.remove(index)
    return probability


def test_plackett_luce_top1_frequencies_match_softmax() -> None:
    golds, temperature, draws = [0.6, 0.1, -0.2, 0.3], 0.4, 20_000
    rng = random.Random(8)
    counts = [0] * len(golds)
    for _ in range(draws):
        counts[plackett_luce_ranking(golds, temperature, rng)[0]] += 1
    weights = [math.exp(g / temperature) for g in golds]
    for count, weight in zip(counts, weights, strict=True):
        target = weight / sum(weights)
        assert abs(count / draws - target) < binomial_tolerance(target, draws)


def test_plackett_luce_full_ranking_frequencies_match_the_sequential_model() -> None:
    golds, temperature, draws = [0.5, 0.0, -0.4], 0.5, 20_000
    rng = random.Random(9)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(draws):
        order = tuple(plackett_luce_ranking(golds, temperature, rng))
        counts[order] = counts.get(order, 0) + 1
    for order in itertools.permutations(range(3)):
        target = plackett_luce_probability(golds, order, temperature)
        assert abs(counts.get(order, 0) / draws - target) < binomial_tolerance(target, draws)


def test_plackett_luce_at_zero_temperature_sorts_by_gold() -> None:
    rng = random.Random(10)
    assert plackett_luce_ranking([0.1, 0.9, -0.3, 0.5], 0.0, rng) == [1, 3, 0, 2]
    firsts = {plackett_luce_ranking([0.2, 0.2, -1.0], 0.0, rng)[0] for _ in range(100)}
    assert firsts == {0, 1}  # ties in random order


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=1, max_size=8), st.floats(0.0, 2.0), st.integers(0, 99))
def test_plackett_luce_returns_a_permutation(golds: list[float], temperature: float, seed: int):
    order = plackett_luce_ranking(golds, temperature, random.Random(seed))
    assert sorted(order) == list(range(len(golds)))


def test_annotators_rank_with_plackett_luce() -> None:
    annotators = SimulatedAnnotators(1e-6, n_annotators=2, seed=0)
    label = annotators.rank([0.0, 0.8, -0.5, 0.4])
    assert label.order == [1, 3, 0, 2]
    assert label.annotator in {"annotator-0", "annotator-1"}
