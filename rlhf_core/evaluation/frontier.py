"""The reward–KL frontier: which policies are best for their distance from SFT, and whether one
method's frontier dominates another's.

Methods that trade reward against staying close to the reference are compared by their
frontier, not by single runs: every point is (KL to SFT, score), a point is kept when no other
point has at most its KL and at least its score (Pareto), and one method dominates another
when its frontier scores at least as high at every KL both reach (Rafailov et al. 2023, "Direct
Preference Optimization", arXiv:2305.18290, Fig. 2; Gao et al. 2023, "Scaling Laws for Reward
Model Overoptimization", arXiv:2210.10760). Scores are "gold" (the demo's gold judge) or "rm"
(the reward model). Pure functions: no I/O, no plotting.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from rlhf_core.evaluation.metrics import bootstrap_ci

Score = Literal["gold", "rm"]
SCORES: tuple[Score, ...] = ("gold", "rm")


@dataclass(frozen=True)
class ScoreEstimate:
    """A mean score with its percentile-bootstrap interval (low, high)."""

    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class FrontierPoint:
    """One evaluated policy on the reward–KL plane.

    Attributes:
        method: "dpo", "ppo" or "best_of_n" (best-of-1 is SFT itself, at KL 0).
        parameter: the knob that placed it: "beta", "target_kl" or "n".
        value: the knob's value.
        kl: KL(policy ‖ SFT) in nats (Monte-Carlo for trained policies, analytic for best-of-n).
        kl_stderr: the standard error of a Monte-Carlo KL; None for an analytic one.
        gold: the gold judge's mean score with its interval; None without a gold judge.
        rm: the reward model's mean score with its interval.
        experiment: the DVC experiment the point came from.
    """

    method: str
    parameter: str
    value: float
    kl: float
    kl_stderr: float | None
    gold: ScoreEstimate | None
    rm: ScoreEstimate
    experiment: str = ""

    def score(self, kind: Score) -> float | None:
        estimate = self.gold if kind == "gold" else self.rm
        return None if estimate is None else estimate.mean


@dataclass(frozen=True)
class FrontierComparison:
    """How frontier `a` compares with frontier `b` where both reach.

    Attributes:
        kind: "dominates" (a ≥ b everywhere, > somewhere), "dominated" (the reverse), "cross"
            (each ahead somewhere), "equal", or "incomparable" (a frontier is empty).
        verdict: one sentence for a report, e.g. "DPO's frontier dominates PPO's".
        kl_range: (low, high) KL over which both were compared; None when incomparable.
        mean_gap: the average of a − b over kl_range (area between the frontiers divided by
            the range's width); at a single KL, the gap there. None when incomparable.
        crossings: KLs where a − b changes sign.
    """

    kind: str
    verdict: str
    kl_range: tuple[float, float] | None
    mean_gap: float | None
    crossings: tuple[float, ...]


def score_estimate(
    scores: Any, prompt_ids: Any = None, *, seed: int = 0, n_boot: int = 1000
) -> ScoreEstimate:
    """Mean of per-response `scores` (responses,) with a 95% bootstrap interval that resamples
    whole prompts when `prompt_ids` (responses,) says which prompt each response answers
    (`metrics.bootstrap_ci`): several answers to one prompt are not independent."""
    values = np.asarray(scores, dtype=float)
    interval = bootstrap_ci(values, seed=seed, n_boot=n_boot, groups=prompt_ids)
    return ScoreEstimate(float(values.mean()), interval.low, interval.high)


def _scored(points: Sequence[FrontierPoint], kind: Score) -> list[tuple[float, float]]:
    """(kl, score) of each point with a finite KL and score, sorted by KL then best score."""
    pairs = [
        (point.kl, score)
        for point in points
        if (score := point.score(kind)) is not None
        and math.isfinite(point.kl)
        and math.isfinite(score)
    ]
    return sorted(pairs, key=lambda pair: (pair[0], -pair[1]))


def pareto_front(points: Sequence[FrontierPoint], kind: Score) -> list[FrontierPoint]:
    """The points no other point dominates on `kind`, in order of KL.

    q dominates p when q.kl ≤ p.kl and q.score ≥ p.score with one of them strict, so walking
    the points by increasing KL a point is on the front exactly when it scores above every
    point before it. Of two points with the same KL and score the first listed is kept.
    Points without a score of `kind` are left out.
    """
    candidates = sorted(
        (
            (index, point)
            for index, point in enumerate(points)
            if (score := point.score(kind)) is not None
            and math.isfinite(point.kl)
            and math.isfinite(score)
        ),
        key=lambda item: (item[1].kl, -(item[1].score(kind) or 0.0), item[0]),
    )
    front: list[FrontierPoint] = []
    best = -math.inf
    for _, point in candidates:
        score = point.score(kind)
        assert score is not None  # filtered above
        if score > best:
            front.append(point)
            best = score
    return front


def frontier_score(front: Sequence[FrontierPoint], kind: Score, kl: float) -> float | None:
    """The frontier's score at `kl`: linear interpolation between neighbouring front points,
    the last point's score beyond the largest KL (a policy may always stay nearer to SFT than
    its budget allows), and None below the smallest KL (no point reaches that close)."""
    pairs = _scored(front, kind)
    if not pairs or kl < pairs[0][0]:
        return None
    kls = [pair[0] for pair in pairs]
    scores = [pair[1] for pair in pairs]
    if kl >= kls[-1]:
        return scores[-1]
    return float(np.interp(kl, kls, scores))


def compare_fronts(
    a: Sequence[FrontierPoint],
    b: Sequence[FrontierPoint],
    kind: Score,
    names: tuple[str, str] = ("DPO", "PPO"),
    *,
    tolerance: float = 0.0,
) -> FrontierComparison:
    """Compare frontiers `a` and `b` (each from `pareto_front`, or raw points) on `kind`.

    Both are compared from the larger of their smallest KLs (below it one of them has no
    point) up to the larger of their largest KLs (past its last point a frontier keeps its
    best score, `frontier_score`). Both frontiers are piecewise linear with corners at their
    points' KLs, so the sign of a − b at those corners decides everywhere: a dominates when
    a − b ≥ −tolerance at every corner and > tolerance at one, and they cross when each is
    ahead by more than `tolerance` somewhere. `mean_gap` integrates a − b exactly (trapezoids
    between corners) and divides by the range's width.
    """
    first, second = names
    a_front, b_front = pareto_front(a, kind), pareto_front(b, kind)
    if not a_front or not b_front:
        empty = first if not a_front else second
        return FrontierComparison(
            "incomparable", f"{empty} has no {kind} scores to compare", None, None, ()
        )
    low = max(a_front[0].kl, b_front[0].kl)
    high = max(a_front[-1].kl, b_front[-1].kl)
    corners = sorted({low, high, *(p.kl for p in (*a_front, *b_front) if low <= p.kl <= high)})
    gaps = [
        _gap(frontier_score(a_front, kind, kl), frontier_score(b_front, kind, kl)) for kl in corners
    ]
    crossings = _crossings(corners, gaps, tolerance)
    # At a single common KL the gap there; else the area between the frontiers per nat.
    mean_gap = gaps[0] if high == low else float(np.trapezoid(gaps, corners) / (high - low))
    ahead = any(gap > tolerance for gap in gaps)
    behind = any(gap < -tolerance for gap in gaps)
    if ahead and behind:
        where = ", ".join(f"{kl:.3g}" for kl in crossings)
        outcome, verdict = "cross", f"{first}'s and {second}'s frontiers cross (at KL ≈ {where})"
    elif ahead:
        outcome, verdict = "dominates", f"{first}'s frontier dominates {second}'s"
    elif behind:
        outcome = "dominated"
        verdict = f"{first}'s frontier does not dominate {second}'s: {second}'s dominates"
    else:
        outcome, verdict = "equal", f"{first}'s and {second}'s frontiers are equal"
    span = f"KL {low:.3g}–{high:.3g} nats" if high > low else f"KL {low:.3g} nats"
    return FrontierComparison(
        outcome, f"{verdict} on {kind} score over {span}", (low, high), mean_gap, crossings
    )


def _gap(a_score: float | None, b_score: float | None) -> float:
    assert a_score is not None and b_score is not None  # both defined from `low` on
    return a_score - b_score


def _crossings(corners: list[float], gaps: list[float], tolerance: float) -> tuple[float, ...]:
    """KLs where the gap a − b goes from one side of ±tolerance to the other: between two
    such corners, the first KL where the piecewise-linear gap reaches 0."""
    clear = [index for index, gap in enumerate(gaps) if abs(gap) > tolerance]
    found = []
    for left, right in itertools.pairwise(clear):
        if gaps[left] * gaps[right] > 0:
            continue
        for i in range(left, right):
            if gaps[i + 1] == 0 or gaps[i] * gaps[i + 1] < 0:
                found.append(
                    corners[i] + (corners[i + 1] - corners[i]) * gaps[i] / (gaps[i] - gaps[i + 1])
                )
                break
    return tuple(found)
