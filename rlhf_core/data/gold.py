"""The demo task's gold judge and its simulated annotators.

The gold judge scores a movie review for positive sentiment (VADER) and discounts degenerate
text; it plays the role of the human preference that the reward model never sees. Simulated
annotators turn gold scores into noisy pairwise labels (Bradley-Terry) or rankings
(Plackett-Luce) with a known temperature, so the best accuracy any reward model can reach on
their labels is known in closed form (`expected_agreement`).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

_WORD = re.compile(r"[a-z0-9']+")
_SENTENCE_END = (".", "!", "?", '."', '!"', '?"')


def words_of(text: str) -> list[str]:
    """Lower-cased word tokens of `text` (letters, digits, apostrophes), in order."""
    return _WORD.findall(text.lower())


# Words that show a text is about a film. Every fluent demo review contains at least one.
FILM_WORDS = frozenset(
    words_of(
        "film films movie movies cinema story stories plot acting actor actors actress cast"
        " script dialogue music soundtrack score ending pacing camera visuals direction"
        " director performance performances scene scenes character characters design"
    )
)


@dataclass(frozen=True)
class GoldBreakdown:
    """How `GoldJudge` arrived at a score: the sentiment, each quality factor, and the score."""

    compound: float  # VADER compound sentiment in [-1, 1]
    repetition: float  # 1 = enough distinct words, 0 = a loop of a few words
    truncation: float  # 1 = ends like a sentence, else GoldJudge.truncation_factor
    brevity: float  # min(1, words / min_words)
    topic: float  # 1 = mentions the film, else GoldJudge.off_topic_factor
    quality: float  # product of the four factors, in [0, 1]
    score: float  # quality * (compound + 1) - 1, in [-1, 1]


class GoldJudge:
    """Gold reward of a review: its VADER sentiment, pulled towards -1 when the text is degenerate.

    score = q * (c + 1) - 1, in [-1, 1], where c is VADER's compound sentiment of the text
    (Hutto & Gilbert 2014, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of
    Social Media Text") and q in [0, 1] is a quality factor, the product of:

    - repetition: with r = distinct words / words, 1 when r >= `min_distinct_ratio`, falling
      linearly to 0 at r <= `zero_distinct_ratio`. "great great great great" has VADER
      compound ~0.99; without this term it would be the best review there is.
    - truncation: `truncation_factor` when the text does not end with . ! or ?, else 1. A
      review cut off mid-sentence (or a policy hitting its token limit) is unfinished.
    - brevity: min(1, words / `min_words`). "Great!" alone is not a review.
    - topic: `off_topic_factor` when the text contains none of `topic_words`, else 1. Cheerful
      text about anything but the film must not win a movie-review task.

    For fluent text q = 1 and the score is the plain sentiment; a fully degenerate text
    (q = 0) scores -1, as low as the most negative review; empty text scores -1. Between, the
    score is monotone in both sentiment and quality, so no amount of positive words can buy
    back degeneracy. The judge is deterministic (VADER is a lexicon and rules).
    """

    def __init__(
        self,
        min_distinct_ratio: float = 0.5,
        zero_distinct_ratio: float = 0.25,
        truncation_factor: float = 0.5,
        min_words: int = 8,
        off_topic_factor: float = 0.5,
        topic_words: Iterable[str] = FILM_WORDS,
    ) -> None:
        if not 0.0 <= zero_distinct_ratio < min_distinct_ratio <= 1.0:
            raise ValueError(
                "GoldJudge needs 0 <= zero_distinct_ratio < min_distinct_ratio <= 1, got "
                f"{zero_distinct_ratio} and {min_distinct_ratio}."
            )
        for name, factor in (
            ("truncation_factor", truncation_factor),
            ("off_topic_factor", off_topic_factor),
        ):
            if not 0.0 <= factor <= 1.0:
                raise ValueError(f"GoldJudge {name} must be in [0, 1], got {factor}.")
        if min_words < 1:
            raise ValueError(f"GoldJudge min_words must be at least 1, got {min_words}.")
        self.min_distinct_ratio = min_distinct_ratio
        self.zero_distinct_ratio = zero_distinct_ratio
        self.truncation_factor = truncation_factor
        self.min_words = min_words
        self.off_topic_factor = off_topic_factor
        self.topic_words = frozenset(word.lower() for word in topic_words)
        self._vader = SentimentIntensityAnalyzer()

    def breakdown(self, text: str) -> GoldBreakdown:
        """Every term of the score of `text` (see the class docstring for the formula)."""
        words = words_of(text)
        if not words:
            return GoldBreakdown(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
        compound = float(self._vader.polarity_scores(text)["compound"])
        distinct_ratio = len(set(words)) / len(words)
        span = self.min_distinct_ratio - self.zero_distinct_ratio
        repetition = min(1.0, max(0.0, (distinct_ratio - self.zero_distinct_ratio) / span))
        finished = text.rstrip().endswith(_SENTENCE_END)
        truncation = 1.0 if finished else self.truncation_factor
        brevity = min(1.0, len(words) / self.min_words)
        on_topic = not self.topic_words or any(word in self.topic_words for word in words)
        topic = 1.0 if on_topic else self.off_topic_factor
        quality = repetition * truncation * brevity * topic
        score = quality * (compound + 1.0) - 1.0
        return GoldBreakdown(compound, repetition, truncation, brevity, topic, quality, score)

    def score(self, text: str) -> float:
        """Gold score of one response, in [-1, 1]; higher is a more positive, fluent review."""
        return self.breakdown(text).score

    def score_batch(self, texts: Iterable[str]) -> list[float]:
        """Gold scores of many responses, in order."""
        return [self.score(text) for text in texts]


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)) or temperature < 0:
        raise ValueError(
            "annotator temperature must be a finite number >= 0 (0 = noiseless), "
            f"got {temperature!r}."
        )


def sigmoid(x: float) -> float:
    """Logistic function 1 / (1 + exp(-x)), computed without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    exp_x = math.exp(x)
    return exp_x / (1.0 + exp_x)


def bradley_terry_probability(gold_a: float, gold_b: float, temperature: float) -> float:
    """P(a is preferred to b) = sigmoid((g_a - g_b) / T); at T = 0 it is 1, 0, or 0.5 for a tie.

    Bradley & Terry 1952, "Rank Analysis of Incomplete Block Designs: I. The Method of Paired
    Comparisons"; the preference model of RLHF reward modelling (Christiano et al. 2017,
    arXiv:1706.03741) and of DPO (Rafailov et al. 2023, arXiv:2305.18290).
    """
    _check_temperature(temperature)
    if temperature == 0:
        return 0.5 if gold_a == gold_b else float(gold_a > gold_b)
    return sigmoid((gold_a - gold_b) / temperature)


def bradley_terry_label(
    gold_a: float, gold_b: float, temperature: float, rng: random.Random
) -> bool:
    """One noisy annotator's choice: True (a preferred) with P = sigmoid((g_a - g_b) / T).

    T = 0 is a noiseless annotator who always picks the higher gold score (a fair coin on ties).
    """
    return rng.random() < bradley_terry_probability(gold_a, gold_b, temperature)


def expected_agreement(
    gold_a: Sequence[float], gold_b: Sequence[float], temperature: float
) -> float:
    """Mean over pairs of P(the BT label agrees with the gold ordering) = mean sigmoid(|Δ| / T).

    Δ = g_a - g_b; a tie (Δ = 0) counts 0.5, and at T = 0 every other pair counts 1. This is
    also the accuracy ceiling of any reward model on held-out annotator labels: given the pair,
    the label is a coin with P(a) = sigmoid(Δ / T) whatever else is known, so the Bayes-optimal
    prediction is the gold ordering and it is right with probability sigmoid(|Δ| / T).
    """
    if len(gold_a) != len(gold_b) or not gold_a:
        raise ValueError(
            "expected_agreement needs two equally long, non-empty lists of gold scores, got "
            f"{len(gold_a)} and {len(gold_b)}."
        )
    total = 0.0
    for a, b in zip(gold_a, gold_b, strict=True):
        total += bradley_terry_probability(max(a, b), min(a, b), temperature)
    return total / len(gold_a)


def observed_agreement(chosen_golds: Sequence[float], rejected_golds: Sequence[float]) -> float:
    """Fraction of labelled pairs whose chosen response has the higher gold score (ties: 0.5)."""
    if len(chosen_golds) != len(rejected_golds) or not chosen_golds:
        raise ValueError(
            "observed_agreement needs two equally long, non-empty lists of gold scores, got "
            f"{len(chosen_golds)} and {len(rejected_golds)}."
        )
    hits = sum(
        1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
        for chosen, rejected in zip(chosen_golds, rejected_golds, strict=True)
    )
    return hits / len(chosen_golds)


def _standard_gumbel(rng: random.Random) -> float:
    uniform = rng.random()
    while uniform == 0.0:  # log(0) is undefined; random() is in [0, 1)
        uniform = rng.random()
    return -math.log(-math.log(uniform))


def plackett_luce_ranking(
    golds: Sequence[float], temperature: float, rng: random.Random
) -> list[int]:
    """A ranking of `golds` (indices, best first) drawn from Plackett-Luce with weights exp(g/T).

    Under Plackett-Luce (Plackett 1975; Luce 1959) the first item is i with probability
    softmax(g / T)_i, the next is drawn the same way from the rest, and so on. Sorting
    g / T + Gumbel(0, 1) noise in descending order is an exact sample of that ranking (the
    Gumbel-max trick; Yellott 1977, Kool et al. 2019, arXiv:1903.06059). At K = 2 it is the
    Bradley-Terry label. T = 0 sorts by gold score, ties in random order.
    """
    _check_temperature(temperature)
    if not golds:
        raise ValueError("plackett_luce_ranking needs at least one gold score, got none.")
    if temperature == 0:
        keys = [(gold, rng.random()) for gold in golds]
    else:
        keys = [(gold / temperature + _standard_gumbel(rng), 0.0) for gold in golds]
    return sorted(range(len(golds)), key=lambda index: keys[index], reverse=True)


@dataclass(frozen=True)
class PairLabel:
    """One annotator's verdict on a pair."""

    a_preferred: bool
    annotator: str


@dataclass(frozen=True)
class RankingLabel:
    """One annotator's ranking of K responses: indices, preferred first."""

    order: list[int]
    annotator: str


class SimulatedAnnotators:
    """A pool of identical Bradley-Terry / Plackett-Luce annotators with one temperature.

    Each item goes to an annotator drawn uniformly from the pool, whose id (`annotator-<k>`)
    is recorded with the label. All draws come from one generator seeded by `seed`, so the same
    sequence of calls gives the same labels.
    """

    def __init__(self, temperature: float, n_annotators: int, seed: int) -> None:
        _check_temperature(temperature)
        if n_annotators < 1:
            raise ValueError(f"n_annotators must be at least 1, got {n_annotators}.")
        self.temperature = float(temperature)
        self.n_annotators = n_annotators
        self._rng = random.Random(seed)

    def _annotator(self) -> str:
        return f"annotator-{self._rng.randrange(self.n_annotators)}"

    def label_pair(self, gold_a: float, gold_b: float) -> PairLabel:
        """Label one pair: which of a and b a (randomly assigned) annotator prefers."""
        annotator = self._annotator()
        return PairLabel(
            bradley_terry_label(gold_a, gold_b, self.temperature, self._rng), annotator
        )

    def rank(self, golds: Sequence[float]) -> RankingLabel:
        """Rank K responses by their gold scores with Plackett-Luce noise."""
        annotator = self._annotator()
        return RankingLabel(plackett_luce_ranking(golds, self.temperature, self._rng), annotator)
