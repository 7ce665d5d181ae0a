"""Evaluation metrics for aligned policies: win rates, diversity, length, KL and best-of-n.

Pure functions of numbers and strings (no models, no I/O). The evaluation stage generates and
scores responses, then calls these to turn the scores into the per-policy numbers it reports.
Scores may be lists, numpy arrays or CPU torch tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval

# Keys of `summarise_policy`'s dict, in the order a report shows them.
POLICY_SUMMARY_KEYS = (
    "gold_score_mean",
    "rm_score_mean",
    "gold_win_rate_vs_sft",
    "rm_win_rate_vs_sft",
    "kl_to_sft",
    "mean_length",
    "distinct_1",
    "distinct_2",
)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _as_vector(values: Any, name: str) -> np.ndarray:
    """`values` as a non-empty 1-D float64 array of finite numbers, or a ValueError."""
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers but has shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"{name} is empty; it needs at least one value.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values; every score must be finite.")
    return array


def _as_pair(scores_a: Any, scores_b: Any, names: tuple[str, str]) -> tuple[np.ndarray, ...]:
    first, second = _as_vector(scores_a, names[0]), _as_vector(scores_b, names[1])
    if first.shape != second.shape:
        raise ValueError(
            f"{names[0]} has {first.size} values but {names[1]} has {second.size}; "
            "paired scores need one value each per item."
        )
    return first, second


# --------------------------------------------------------------------------------------------
# Win rates
# --------------------------------------------------------------------------------------------


def win_indicators(scores_a: Any, scores_b: Any) -> np.ndarray:
    """Per-item outcome of A against B: 1 where a > b, ½ where a = b, 0 where a < b.

    The mean of these is `win_rate`; resample them with `bootstrap_ci` for its uncertainty.

    Args:
        scores_a: (items,) scores of policy A's responses.
        scores_b: (items,) scores of policy B's responses to the same prompts, in the same order.

    Returns:
        (items,) float64 array of 1.0, 0.5 and 0.0.
    """
    first, second = _as_pair(scores_a, scores_b, ("scores_a", "scores_b"))
    return np.where(first > second, 1.0, np.where(first == second, 0.5, 0.0))


def win_rate(scores_a: Any, scores_b: Any) -> float:
    """Fraction of paired items on which A scores higher than B, a tie counting as half a win.

    win_rate = (1/N) Σᵢ ( 1[aᵢ > bᵢ] + ½ · 1[aᵢ = bᵢ] ).

    Counting ties as ½ is the usual convention for head-to-head evaluation of aligned models
    (e.g. AlpacaEval, Dubois et al. 2024, arXiv:2404.04475; the win rates against a reference
    policy in DPO, Rafailov et al. 2023, arXiv:2305.18290). It makes win_rate(a, b) +
    win_rate(b, a) = 1, and a policy scores exactly ½ against itself.

    Args:
        scores_a: (items,) scores of policy A's responses.
        scores_b: (items,) scores of policy B's responses to the same prompts, in the same order.
    """
    return float(win_indicators(scores_a, scores_b).mean())


# --------------------------------------------------------------------------------------------
# Diversity and length
# --------------------------------------------------------------------------------------------


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: the number of distinct n-grams divided by the number of n-grams.

    distinct-n = |{n-grams over all texts}| / Σ_texts (number of n-grams in the text)

    over the whole set of texts (corpus-level, as in Li et al. 2016, "A Diversity-Promoting
    Objective Function for Neural Conversation Models", arXiv:1510.03055). Texts are split on
    whitespace and n-grams never span two texts. A policy that collapses onto a few phrases has
    low distinct-n. Returns 0.0 when the texts hold no n-gram at all (e.g. all shorter than n).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer but is {n!r}.")
    distinct: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[start : start + n]) for start in range(len(words) - n + 1)]
        distinct.update(grams)
        total += len(grams)
    return len(distinct) / total if total else 0.0


def mean_length(texts: Sequence[str], unit: Literal["words", "chars"] = "words") -> float:
    """Mean length of `texts` in whitespace-separated words or in characters.

    Length matters because reward models and judges favour longer answers (Singhal et al.
    2023, "A Long Way to Go: Investigating Length Correlations in RLHF", arXiv:2310.03716):
    a reward gain that comes with a length gain deserves a second look.
    """
    if unit not in ("words", "chars"):
        raise ValueError(f"unit must be 'words' or 'chars' but is {unit!r}.")
    if len(texts) == 0:
        raise ValueError("texts is empty; the mean length of no texts is undefined.")
    lengths = [len(text.split()) if unit == "words" else len(text) for text in texts]
    return float(np.mean(lengths))


def mean_token_length(token_ids: Sequence[Sequence[int]]) -> float:
    """Mean number of tokens per response, given each response's token ids.

    Each entry may be a list, an array or a 1-D tensor of ids. Count only the generated tokens
    (no prompt, no padding) to compare policies fairly.
    """
    if len(token_ids) == 0:
        raise ValueError("token_ids is empty; the mean length of no responses is undefined.")
    return float(np.mean([len(ids) for ids in token_ids]))


# --------------------------------------------------------------------------------------------
# Best-of-n
# --------------------------------------------------------------------------------------------


def best_of_n_kl(n: int) -> float:
    """KL(π_bon ‖ π) of best-of-n sampling from its base policy π: log n − (n − 1)/n.

    Best-of-n draws n responses from π and keeps the one the reward model scores highest. The
    closed form is the one used to put best-of-n on the same KL axis as RL policies (Stiennon
    et al. 2020, "Learning to summarize from human feedback", arXiv:2009.01325, appendix;
    Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization", arXiv:2210.10760). It is
    exact only when no two of the n draws tie in reward; in general it is an upper bound on the
    true KL (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy",
    arXiv:2401.01879), which is far smaller when π puts much mass on few responses.

    n = 1 gives 0 (best-of-1 is π itself); the value grows like log n.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive integer but is {n!r}.")
    return math.log(n) - (n - 1) / n


def best_of_n_select(scores: Any) -> np.ndarray:
    """Index of the best of the n candidates for each prompt (the argmax of each row).

    Ties go to the lowest index, so selection is deterministic and, when candidates are sampled
    in order, picks the earliest of equally good responses.

    Args:
        scores: (num_prompts, n) reward of each candidate response.

    Returns:
        (num_prompts,) int64 indices in [0, n).
    """
    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().numpy()
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(
            f"scores must have shape (num_prompts, n) with both at least 1 but has shape "
            f"{matrix.shape}."
        )
    if not np.all(np.isfinite(matrix)):
        raise ValueError("scores contains NaN or infinite values; every score must be finite.")
    return np.argmax(matrix, axis=1).astype(np.int64)  # argmax returns the first maximum


# --------------------------------------------------------------------------------------------
# KL to the reference policy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KLEstimate:
    """A Monte-Carlo estimate of a KL divergence and its standard error (in nats)."""

    mean: float
    stderr: float  # NaN when there is a single sample
    num_samples: int


def kl_from_logprob_sums(policy_logps: Any, reference_logps: Any) -> KLEstimate:
    """Monte-Carlo estimate of KL(π ‖ π_ref) from responses sampled from π.

    KL(π ‖ π_ref) = E_{y∼π}[log π(y|x) − log π_ref(y|x)] ≈ (1/N) Σᵢ dᵢ, with
    dᵢ = log π(yᵢ|xᵢ) − log π_ref(yᵢ|xᵢ) the sequence-level log-ratio (sum over the response's
    tokens), and standard error s_d / √N where s_d is the sample standard deviation (ddof = 1).

    This is the unbiased "k1" estimator (Schulman 2020, "Approximating KL Divergence",
    http://joschu.net/blog/kl-approx.html), the sequence-level KL that RLHF penalises
    (Stiennon et al. 2020, arXiv:2009.01325). Single samples can be negative; the mean is not,
    in expectation. It is only valid when the responses were sampled from π itself (at the
    temperature that defines π), not from π_ref or a different decoding setting.

    Args:
        policy_logps: (samples,) summed response log-probabilities under π.
        reference_logps: (samples,) summed log-probabilities of the same responses under π_ref.
    """
    policy, reference = _as_pair(policy_logps, reference_logps, ("policy_logps", "reference_logps"))
    log_ratios = policy - reference  # (samples,)
    count = log_ratios.size
    stderr = float(log_ratios.std(ddof=1) / math.sqrt(count)) if count > 1 else math.nan
    return KLEstimate(mean=float(log_ratios.mean()), stderr=stderr, num_samples=count)


# --------------------------------------------------------------------------------------------
# Uncertainty
# --------------------------------------------------------------------------------------------


class ConfidenceInterval(NamedTuple):
    """Lower and upper end of a confidence interval."""

    low: float
    high: float


def wilson_interval(successes: float, trials: int, z: float = Z_95) -> ConfidenceInterval:
    """Wilson score interval of a binomial proportion (95% with the default z).

    With p̂ = k/n:  centre = (p̂ + z²/2n) / (1 + z²/n),
                   half-width = z / (1 + z²/n) · √(p̂(1 − p̂)/n + z²/4n²).

    Wilson 1927, "Probable inference, the law of succession, and statistical inference"
    (JASA 22:209-212); recommended over the normal (Wald) interval by Brown, Cai & DasGupta
    2001, "Interval Estimation for a Binomial Proportion" (Statistical Science 16:101-133):
    it stays inside [0, 1] and keeps its coverage near 0 and 1 (a good reward model's accuracy
    on easy pairs, a handful of people's votes). Fractional successes (a tie counted ½ a
    win) enter the same formula.
    """
    if isinstance(trials, bool) or not isinstance(trials, int | np.integer) or trials < 1:
        raise ValueError(f"trials must be a positive integer but is {trials!r}.")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be between 0 and trials={trials} but is {successes!r}.")
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a positive number but is {z!r}.")
    share = successes / trials
    spread = z * z / trials
    centre = (share + spread / 2) / (1 + spread)
    half = z / (1 + spread) * math.sqrt(share * (1 - share) / trials + spread / (4 * trials))
    return ConfidenceInterval(max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ci(
    values: Any,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Any = None,
) -> ConfidenceInterval:
    """Percentile-bootstrap (1 − alpha) confidence interval of `stat(values)`.

    Resample with replacement `n_boot` times, compute the statistic on each resample, and
    take the alpha/2 and 1 − alpha/2 quantiles of those statistics (Efron & Tibshirani 1993,
    "An Introduction to the Bootstrap", ch. 13). With `groups`, whole groups are resampled
    (the cluster bootstrap, ch. 8.5 of Davison & Hinkley 1997): several samples of one prompt
    are not independent, and resampling them one by one would give too narrow an interval.
    For a win rate pass the paired outcomes from `win_indicators`: resampling items, not the
    two policies separately, keeps the pairing. Deterministic for a given seed.

    Args:
        values: (items,) per-item values.
        stat: maps a 1-D array to a number; defaults to the mean.
        n_boot: number of bootstrap resamples.
        alpha: 1 − confidence level (0.05 for a 95% interval).
        seed: seed of the resampling generator.
        groups: (items,) the group of each value (e.g. its prompt), or None for one per value.
    """
    array = _as_vector(values, "values")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer but is {n_boot!r}.")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be strictly between 0 and 1 but is {alpha!r}.")
    if groups is None:
        members = [np.array([index]) for index in range(array.size)]
    else:
        labels = np.asarray(groups)
        if labels.shape != array.shape:
            raise ValueError(
                f"groups has shape {labels.shape} but values has {array.shape}; give one group "
                "per value."
            )
        members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    rng = np.random.default_rng(seed)
    # One resample at a time keeps memory at O(items) however many resamples are drawn.
    statistics = np.empty(n_boot)
    for index in range(n_boot):
        chosen = rng.integers(0, len(members), size=len(members))
        statistics[index] = stat(array[np.concatenate([members[i] for i in chosen])])
    low, high = np.quantile(statistics, [alpha / 2, 1 - alpha / 2])
    return ConfidenceInterval(float(low), float(high))


# --------------------------------------------------------------------------------------------
# One policy's summary
# --------------------------------------------------------------------------------------------


def summarise_policy(
    *,
    gold_scores: Any,
    rm_scores: Any,
    sft_gold_scores: Any,
    sft_rm_scores: Any,
    texts: Sequence[str],
    kl_to_sft: float,
    with_ci: bool = True,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    prompt_ids: Any = None,
) -> dict[str, float]:
    """The numbers the evaluation report shows for one policy, against the SFT policy.

    Keys (`POLICY_SUMMARY_KEYS`): gold_score_mean, rm_score_mean, gold_win_rate_vs_sft,
    rm_win_rate_vs_sft (`win_rate` of this policy over SFT on the same prompts), kl_to_sft
    (passed through, e.g. `kl_from_logprob_sums(...).mean` or `best_of_n_kl(n)`), mean_length
    (words), distinct_1, distinct_2. With `with_ci`, each win rate also gets
    `<key>_ci_low` / `<key>_ci_high` from `bootstrap_ci` over the paired outcomes, resampled
    by prompt when `prompt_ids` (items,) says which prompt each response answers.

    Args:
        gold_scores: (prompts,) gold-judge scores of this policy's responses.
        rm_scores: (prompts,) reward-model scores of this policy's responses.
        sft_gold_scores: (prompts,) gold-judge scores of the SFT policy's responses.
        sft_rm_scores: (prompts,) reward-model scores of the SFT policy's responses.
        texts: (prompts,) this policy's responses, in the same prompt order.
        kl_to_sft: KL(policy ‖ SFT) in nats.
    """
    gold, sft_gold = _as_pair(gold_scores, sft_gold_scores, ("gold_scores", "sft_gold_scores"))
    reward, sft_reward = _as_pair(rm_scores, sft_rm_scores, ("rm_scores", "sft_rm_scores"))
    if reward.size != gold.size or len(texts) != gold.size:
        raise ValueError(
            f"gold_scores, rm_scores and texts have {gold.size}, {reward.size} and {len(texts)} "
            "entries; give one gold score, one reward and one text per response."
        )
    if not math.isfinite(kl_to_sft):
        raise ValueError(f"kl_to_sft must be a finite number but is {kl_to_sft!r}.")
    outcomes = {  # (prompts,) paired outcome against SFT: 1 win, ½ tie, 0 loss
        "gold_win_rate_vs_sft": win_indicators(gold, sft_gold),
        "rm_win_rate_vs_sft": win_indicators(reward, sft_reward),
    }
    summary = {
        "gold_score_mean": float(gold.mean()),
        "rm_score_mean": float(reward.mean()),
        "gold_win_rate_vs_sft": float(outcomes["gold_win_rate_vs_sft"].mean()),
        "rm_win_rate_vs_sft": float(outcomes["rm_win_rate_vs_sft"].mean()),
        "kl_to_sft": float(kl_to_sft),
        "mean_length": mean_length(texts, unit="words"),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
    }
    if with_ci:
        for key, values in outcomes.items():
            interval = bootstrap_ci(
                values, n_boot=n_boot, alpha=alpha, seed=seed, groups=prompt_ids
            )
            summary[f"{key}_ci_low"], summary[f"{key}_ci_high"] = interval
    return summary
