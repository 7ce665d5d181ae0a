"""Reward-model overoptimisation: Gao et al.'s fits of score against KL, and an alarm.

Optimising a proxy reward (the reward model) past a point makes the true reward (the gold
judge) fall while the proxy keeps rising (Gao, Schulman & Hilton 2023, "Scaling Laws for
Reward Model Overoptimization", arXiv:2210.10760). With d = √KL(policy ‖ initial policy) they
fit the gold score's gain over the initial policy as

    best-of-n:  R_bon(d) = d (α − β d)
    RL:         R_RL(d)  = d (α − β log d)

Both are linear in (α, β), so least squares on the (d, R − R₀) pairs fits them exactly. The
alarm needs no functional form: it fires when, over the last few evaluations, the proxy's
fitted trend rises while the gold's falls. Pure numpy; the PPO stage feeds both its
evaluation history (`rlhf_core.stages.ppo`).

Where the data have no gold judge (anything but the demo), the stand-in is an independent
reward model trained on comparisons the proxy never saw (`reward.judge`, a disjoint split by
prompt); "gold" below means whichever judge scored the evaluations, and the metrics name it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Form = Literal["bon", "rl"]
FORMS: tuple[Form, ...] = ("bon", "rl")


# A fitted peak counts up to this multiple of the largest measured d = √KL (4× its KL); past
# it the RL form's exp(α/β − 1) can be astronomically far (1e55 nats was seen on the demo).
PEAK_REACH = 2.0


@dataclass(frozen=True)
class GaoFit:
    """A least-squares fit of R(d) − R₀ to one of Gao et al.'s forms.

    Attributes:
        form: "bon" (d(α − βd)) or "rl" (d(α − β log d)).
        alpha, beta: the fitted coefficients.
        r_squared: 1 − SS_res / SS_tot of the gains (NaN when every gain is equal).
        peak_d: the d where the fitted curve is highest, None when β ≤ 0 (it never turns
            down within the form) or when that d lies beyond `PEAK_REACH` times the largest
            measured d (a peak there is the form's extrapolation, not something the data
            show); bon: max(0, α / 2β), RL: exp(α/β − 1).
        peak_kl: peak_d², the KL in nats at the peak (None with peak_d).
        points: the (d, gain) pairs the fit used.
    """

    form: Form
    alpha: float
    beta: float
    r_squared: float
    peak_d: float | None
    peak_kl: float | None
    points: int

    def predict(self, kl: Sequence[float] | np.ndarray) -> np.ndarray:
        """The fitted gain R(d) − R₀ at each KL (negative KL estimates count as 0)."""
        distance = _distances(kl)
        return _features(self.form, distance) @ np.array([self.alpha, self.beta])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every attribute."""
        return asdict(self)


def _distances(kl: Sequence[float] | np.ndarray) -> np.ndarray:
    # A Monte-Carlo KL estimate can dip just below 0; a distance is never negative.
    return np.sqrt(np.clip(np.asarray(kl, dtype=float), 0.0, None))


def _features(form: Form, distance: np.ndarray) -> np.ndarray:
    """Columns multiplying (α, β): bon [d, −d²]; RL [d, −d log d] with d log d = 0 at d = 0,
    its limit."""
    if form == "bon":
        return np.column_stack([distance, -(distance**2)])
    safe = np.where(distance > 0, distance, 1.0)
    return np.column_stack([distance, -np.where(distance > 0, distance * np.log(safe), 0.0)])


def fit_gao(
    form: Form,
    kl: Sequence[float],
    scores: Sequence[float],
    initial_score: float | None = None,
) -> GaoFit | None:
    """Fit Gao et al.'s `form` to scores measured at KLs; None when it cannot be fitted.

    `initial_score` is R₀, the score at d = 0 (the initial policy, or SFT for best-of-n);
    None takes the score of the first point at KL ≤ 0 (PPO's evaluation before training), and
    without one there is no R₀ and no fit. Points at d = 0 carry no
    information about (α, β) (both features vanish) and are left out. Needs two points with
    d > 0 whose features are not collinear; NaN scores or KLs are dropped first.
    """
    if form not in FORMS:
        raise ValueError(f"Unknown overoptimisation fit form {form!r}; use one of {FORMS}.")
    kl_values = np.asarray(kl, dtype=float)
    score_values = np.asarray(scores, dtype=float)
    if kl_values.shape != score_values.shape or kl_values.ndim != 1:
        raise ValueError(
            f"fit_gao needs one score per KL, got {kl_values.shape} KLs and "
            f"{score_values.shape} scores."
        )
    finite = np.isfinite(kl_values) & np.isfinite(score_values)
    kl_values, score_values = kl_values[finite], score_values[finite]
    distance = _distances(kl_values)
    if initial_score is None:
        at_start = distance == 0
        if not at_start.any():
            return None
        initial_score = float(score_values[at_start][0])
    if not math.isfinite(initial_score):
        return None
    moved = distance > 0
    distance, gains = distance[moved], score_values[moved] - initial_score
    if len(distance) < 2:
        return None
    features = _features(form, distance)
    if np.linalg.matrix_rank(features) < 2:
        return None
    (alpha, beta), *_ = np.linalg.lstsq(features, gains, rcond=None)
    residual = float(np.sum((gains - features @ np.array([alpha, beta])) ** 2))
    spread = float(np.sum((gains - gains.mean()) ** 2))
    r_squared = 1.0 - residual / spread if spread > 0 else float("nan")
    peak_d = _peak(form, float(alpha), float(beta))
    if peak_d is not None and peak_d > PEAK_REACH * float(distance.max()):
        peak_d = None
    return GaoFit(
        form=form,
        alpha=float(alpha),
        beta=float(beta),
        r_squared=r_squared,
        peak_d=peak_d,
        peak_kl=None if peak_d is None else peak_d**2,
        points=len(distance),
    )


def best_of_n_fit(
    evaluation: Mapping[str, Mapping[str, Any]],
    score: str = "gold_score_mean",
    best_of_n_prefix: str = "bon_",
    reference: str = "sft",
) -> GaoFit | None:
    """The best-of-n form fitted to an evaluate.json-shaped mapping: one point per best-of-n
    policy (`bon_<n>`: its `kl_to_sft`, the analytic log n − (n−1)/n, and its `score`), R₀ the
    reference's (SFT's) `score`. None with fewer than two best-of-n sizes, without the
    reference or with null scores (no gold judge)."""
    initial = (evaluation.get(reference) or {}).get(score)
    points = [
        (metrics.get("kl_to_sft"), metrics.get(score))
        for name, metrics in evaluation.items()
        if name.startswith(best_of_n_prefix)
    ]
    if initial is None or len(points) < 2 or any(None in point for point in points):
        return None
    kl, scores = zip(*points, strict=True)
    return fit_gao("bon", kl, scores, initial_score=float(initial))


def _peak(form: Form, alpha: float, beta: float) -> float | None:
    """Where d(α − βd) or d(α − β log d) is highest: the root of its derivative, α − 2βd or
    α − β(log d + 1). With β ≤ 0 the curve never turns down, so there is no peak; a bon
    curve with α ≤ 0 only falls, so its best is d = 0."""
    if beta <= 0:
        return None
    if form == "bon":
        return max(0.0, alpha / (2.0 * beta))
    exponent = alpha / beta - 1.0
    return math.exp(exponent) if exponent < 700 else None  # beyond float range: no peak seen


# --------------------------------------------------------------------------------------------
# The alarm
# --------------------------------------------------------------------------------------------

DEFAULT_WINDOW = 3
DEFAULT_EPSILON = 0.05


@dataclass(frozen=True)
class OveroptimisationAlarm:
    """The alarm's verdict on a run's evaluations.

    Attributes:
        fired: whether any window of `window` consecutive evaluations had the proxy rising by
            more than `epsilon` while the gold fell by more than `epsilon`.
        first_step: the step (position) of the last evaluation of the first window that
            fired (None when it never fired).
        window, epsilon: the settings it ran with.
        proxy_change, gold_change: the fitted change across the window (least-squares slope
            × the window's step span, in score units) of the first window that fired, or of
            the last window when none did; None with too few evaluations or no gold.
        status: "fired", "silent", "too few evaluations" or `NO_GOLD` (no judge: alarm off).
    """

    fired: bool
    first_step: float | None
    window: int
    epsilon: float
    proxy_change: float | None
    gold_change: float | None
    status: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every attribute."""
        return asdict(self)


NO_GOLD = "no judge (no gold judge, no held-out reward model): alarm off"

# The judges PPO can score its evaluations with: the eval metric `<key>_score_mean`, and what
# the summary calls it.
JUDGES = {"gold": "the gold judge", "judge": "the held-out reward model"}


def window_change(steps: Sequence[float], values: Sequence[float]) -> float:
    """The least-squares line's change from the first to the last step: slope × span.

    A change, not a slope, so the threshold reads in score units whatever the spacing of the
    evaluations (every 2 iterations or every 50)."""
    x = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    span = float(x[-1] - x[0])
    if len(x) < 2 or span <= 0:
        raise ValueError(
            "window_change needs at least two evaluations at increasing steps, got steps "
            f"{list(x)}."
        )
    slope = float(np.polyfit(x, y, 1)[0])
    return slope * span


def overoptimisation_alarm(
    steps: Sequence[float],
    proxy_scores: Sequence[float],
    gold_scores: Sequence[float] | None,
    window: int = DEFAULT_WINDOW,
    epsilon: float = DEFAULT_EPSILON,
) -> OveroptimisationAlarm:
    """Slide a window of `window` evaluations over the run; fire where the proxy's fitted
    change across it is above +`epsilon` while the gold's is below −`epsilon`.

    `steps` are the evaluations' positions in increasing order: PPO's iterations, or the KL
    of a sweep's points along a method's grid (`frontier_report.grid_alarms`).

    Trends over a window, not single steps, so one noisy evaluation cannot fire it, and both
    conditions at once, so a policy that improves on both (or drifts on both) stays silent:
    the disagreement of proxy and gold is what overoptimisation is (Gao et al. 2023). Without
    gold scores (data with no gold judge) the alarm is off and says so.
    """
    if window < 2:
        raise ValueError(
            f"The overoptimisation window must be at least 2 evaluations, got {window}."
        )
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"The overoptimisation epsilon must be a number ≥ 0, got {epsilon}.")
    if gold_scores is None:
        return OveroptimisationAlarm(False, None, window, epsilon, None, None, NO_GOLD)
    if not len(steps) == len(proxy_scores) == len(gold_scores):
        raise ValueError(
            f"The alarm needs one proxy and one gold score per step, got {len(steps)} steps, "
            f"{len(proxy_scores)} proxy and {len(gold_scores)} gold scores."
        )
    if len(steps) < window:
        return OveroptimisationAlarm(
            False, None, window, epsilon, None, None, "too few evaluations"
        )
    windows = [slice(end - window, end) for end in range(window, len(steps) + 1)]
    for span in windows:
        proxy_change = window_change(steps[span], proxy_scores[span])
        gold_change = window_change(steps[span], gold_scores[span])
        if proxy_change > epsilon and gold_change < -epsilon:
            first_step = steps[span][-1]
            return OveroptimisationAlarm(
                True, first_step, window, epsilon, proxy_change, gold_change, "fired"
            )
    return OveroptimisationAlarm(False, None, window, epsilon, proxy_change, gold_change, "silent")


# --------------------------------------------------------------------------------------------
# A PPO run's evaluations
# --------------------------------------------------------------------------------------------

PREFIX = "overoptimisation/"
ALARM_METRIC = f"{PREFIX}alarm"
FIRST_STEP_METRIC = f"{PREFIX}first_step"
STATUS_METRIC = f"{PREFIX}status"
JUDGE_METRIC = f"{PREFIX}judge"


def run_overoptimisation(
    eval_history: Sequence[dict[str, float]],
    window: int = DEFAULT_WINDOW,
    epsilon: float = DEFAULT_EPSILON,
    judge: str | None = "gold",
) -> dict[str, Any]:
    """The alarm and the RL-form fits of a PPO run's evaluations, as flat metrics.

    `eval_history` rows are PPO's evaluations: `step`, `score_mean` (the proxy), `kl_mean`
    and, for each judge that scored them, `<judge>_score_mean`. `judge` (a key of `JUDGES`,
    or None) names the one the alarm trusts. Keys (all under "overoptimisation/"): `judge`
    (None when no judge scored every evaluation), `alarm` (1 fired, 0 silent, None with no
    judge), `first_step`, `status`, `window`, `epsilon`, `proxy_change`, `gold_change` (the
    judge's), and per curve ("proxy", "gold" = the judge's) `<curve>_alpha`, `_beta`, `_r2`,
    `_peak_kl` of the RL form fitted against the evaluation at step 0 (None where there is
    no fit or no peak).
    """
    if judge is not None and judge not in JUDGES:
        raise ValueError(f"Unknown judge {judge!r}; the judges are {', '.join(JUDGES)}.")
    rows = sorted(eval_history, key=lambda row: row["step"])
    steps = [int(row["step"]) for row in rows]
    proxy = [float(row["score_mean"]) for row in rows]
    key = f"{judge}_score_mean"
    has_gold = judge is not None and bool(rows) and all(row.get(key) is not None for row in rows)
    gold = [float(row[key]) for row in rows] if has_gold else None
    alarm = overoptimisation_alarm(steps, proxy, gold, window, epsilon)
    metrics: dict[str, Any] = {
        JUDGE_METRIC: judge if has_gold else None,
        ALARM_METRIC: None if gold is None else int(alarm.fired),
        FIRST_STEP_METRIC: alarm.first_step,
        STATUS_METRIC: alarm.status,
        f"{PREFIX}window": window,
        f"{PREFIX}epsilon": epsilon,
        f"{PREFIX}proxy_change": alarm.proxy_change,
        f"{PREFIX}gold_change": alarm.gold_change,
    }
    kl = [float(row["kl_mean"]) for row in rows]
    initial = rows[0] if rows and rows[0]["step"] == 0 else None
    for curve, scores in (("proxy", proxy), ("gold", gold)):
        fit = None
        if scores is not None and initial is not None:
            fit = fit_gao("rl", kl[1:], scores[1:], initial_score=scores[0])
        metrics[f"{PREFIX}{curve}_alpha"] = None if fit is None else fit.alpha
        metrics[f"{PREFIX}{curve}_beta"] = None if fit is None else fit.beta
        metrics[f"{PREFIX}{curve}_r2"] = None if fit is None else fit.r_squared
        metrics[f"{PREFIX}{curve}_peak_kl"] = None if fit is None else fit.peak_kl
    # JSON metrics hold null, never NaN (an R² of gains that are all equal is undefined).
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in metrics.items()
    }


def overoptimisation_warning(metrics: dict[str, Any]) -> str | None:
    """One line for logs and the run summary when the alarm fired (None otherwise), from the
    metrics `run_overoptimisation` wrote."""
    if metrics.get(ALARM_METRIC) != 1:
        return None
    window = metrics.get(f"{PREFIX}window")
    judge_name = JUDGES.get(metrics.get(JUDGE_METRIC) or "gold", "the judge") + "'s"
    return (
        f"overoptimisation alarm: from step {metrics.get(FIRST_STEP_METRIC)} the reward-model "
        f"score rose by {metrics[f'{PREFIX}proxy_change']:+.3f} while {judge_name} score changed "
        f"by {metrics[f'{PREFIX}gold_change']:+.3f} over {window} evaluations; the policy is "
        "exploiting the reward model (raise the KL penalty, train fewer iterations or improve "
        "the reward model)"
    )
