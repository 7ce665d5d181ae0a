"""The reward–KL frontier's reports: rows for a DVC plot, a markdown table with the verdicts,
and a two-panel figure (gold and reward-model score against KL to SFT, with error bars).

Pure functions from `FrontierPoint`s to rows, a markdown string or a matplotlib Figure (Agg
canvas, no pyplot); the caller writes or logs them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rlhf_core.evaluation.frontier import (
    SCORES,
    FrontierComparison,
    FrontierPoint,
    Score,
    compare_fronts,
    pareto_front,
)
from rlhf_core.evaluation.overoptimisation import (
    DEFAULT_EPSILON,
    DEFAULT_WINDOW,
    GaoFit,
    OveroptimisationAlarm,
    fit_gao,
    overoptimisation_alarm,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

METHOD_NAMES = {"dpo": "DPO", "ppo": "PPO", "best_of_n": "best-of-n"}
METHOD_COLOURS = {"dpo": "C0", "ppo": "C2", "best_of_n": "C1"}
SCORE_LABELS = {"gold": "mean gold score", "rm": "mean reward-model score"}
# The pairs of methods every report compares, first named first in the verdict.
COMPARED = (("dpo", "ppo"), ("dpo", "best_of_n"), ("ppo", "best_of_n"))


def by_method(points: Sequence[FrontierPoint]) -> dict[str, list[FrontierPoint]]:
    """The points grouped by method, in the order the methods first appear."""
    groups: dict[str, list[FrontierPoint]] = {}
    for point in points:
        groups.setdefault(point.method, []).append(point)
    return groups


def scores_present(points: Sequence[FrontierPoint]) -> list[Score]:
    """The score kinds every point has: gold only when all points were judged by it."""
    return [kind for kind in SCORES if points and all(p.score(kind) is not None for p in points)]


def comparisons(points: Sequence[FrontierPoint]) -> dict[str, dict[str, FrontierComparison]]:
    """{score kind: {"dpo_vs_ppo": comparison, ...}} for each pair of methods present."""
    groups = by_method(points)
    return {
        kind: {
            f"{a}_vs_{b}": compare_fronts(
                groups[a], groups[b], kind, (METHOD_NAMES[a], METHOD_NAMES[b])
            )
            for a, b in COMPARED
            if a in groups and b in groups
        }
        for kind in scores_present(points)
    }


def frontier_rows(points: Sequence[FrontierPoint]) -> list[dict[str, Any]]:
    """One row per point for `artifacts/plots/frontier.json` (a DVC plot: x kl_to_sft, y
    gold_score_mean or rm_score_mean), with the intervals and whether the point is on its
    method's Pareto frontier for each score."""
    on_front = {
        kind: {id(p) for group in by_method(points).values() for p in pareto_front(group, kind)}
        for kind in SCORES
    }
    rows = []
    for point in points:
        row: dict[str, Any] = {
            "method": point.method,
            "parameter": point.parameter,
            "value": point.value,
            "experiment": point.experiment,
            "kl_to_sft": point.kl,
            "kl_to_sft_stderr": point.kl_stderr,
        }
        for kind in SCORES:
            estimate = point.gold if kind == "gold" else point.rm
            row[f"{kind}_score_mean"] = None if estimate is None else estimate.mean
            row[f"{kind}_score_ci_low"] = None if estimate is None else estimate.low
            row[f"{kind}_score_ci_high"] = None if estimate is None else estimate.high
            row[f"on_{kind}_frontier"] = id(point) in on_front[kind]
        rows.append(row)
    return rows


def gao_fits(points: Sequence[FrontierPoint]) -> dict[tuple[str, Score], GaoFit]:
    """Gao et al.'s forms fitted to each method's points, per score: best-of-n's
    d(α − βd), DPO's and PPO's d(α − β log d), with d = √KL and R₀ the SFT score (the
    best-of-1 point at KL 0). Left out: a method or score without a fit (no SFT point, fewer
    than two points away from KL 0, no gold judge)."""
    groups = by_method(points)
    sft = next((p for p in groups.get("best_of_n", []) if p.value == 1 and p.kl == 0), None)
    fits: dict[tuple[str, Score], GaoFit] = {}
    for method, members in groups.items():
        for kind in scores_present(points):
            if sft is None:
                continue
            fit = fit_gao(
                "bon" if method == "best_of_n" else "rl",
                [p.kl for p in members],
                [p.score(kind) for p in members],
                initial_score=sft.score(kind),
            )
            if fit is not None:
                fits[(method, kind)] = fit
    return fits


def grid_alarms(
    points: Sequence[FrontierPoint],
    window: int = DEFAULT_WINDOW,
    epsilon: float = DEFAULT_EPSILON,
) -> dict[str, OveroptimisationAlarm]:
    """The overoptimisation alarm along each method's grid: its points in order of KL read as
    one run's evaluations at positions KL (DPO's β grid, PPO's KL targets, best-of-n's n), so
    it fires where, over `window` consecutive points, the reward-model score rises by more
    than `epsilon` while the gold score falls by more than `epsilon`. Best-of-n includes its
    n = 1 point (SFT). Only with a gold judge (else every point's gold is None)."""
    if "gold" not in scores_present(points):
        return {}
    alarms = {}
    for method, members in by_method(points).items():
        ordered = sorted(members, key=lambda p: p.kl)
        kl = [p.kl for p in ordered]
        if len(set(kl)) < len(kl):  # two points at one KL: no order to read a trend in
            continue
        rm = [p.score("rm") for p in ordered]
        gold = [p.score("gold") for p in ordered]
        alarms[method] = overoptimisation_alarm(kl, rm, gold, window, epsilon)
    return alarms


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def frontier_markdown(points: Sequence[FrontierPoint], num_prompts: int | None) -> str:
    """The sweep's report: every point with its intervals, then the verdict of each pair of
    methods for each score (`compare_fronts`) and the mean gap between their frontiers."""
    prompts = f"{num_prompts} held-out prompts" if num_prompts else "the held-out prompts"
    lines = [
        "# Reward–KL frontier\n",
        f"Every point evaluated on {prompts} with the same sampling and seed. KL to SFT in "
        "nats (± the standard error of the Monte-Carlo estimate; best-of-n's is the analytic "
        "log n − (n − 1)/n). Scores are means with 95% bootstrap intervals over prompts; "
        "* marks a point on its method's Pareto frontier.\n",
        "| method | parameter | value | experiment | KL to SFT | ± | gold score | gold 95% CI "
        "| RM score | RM 95% CI |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for row in frontier_rows(points):
        cells = [METHOD_NAMES.get(row["method"], row["method"]), row["parameter"]]
        cells += [f"{row['value']:g}", row["experiment"] or "–"]
        cells += [_number(row["kl_to_sft"]), _number(row["kl_to_sft_stderr"])]
        for kind in SCORES:
            mark = "*" if row[f"on_{kind}_frontier"] else ""
            cells.append(_number(row[f"{kind}_score_mean"]) + mark)
            low, high = row[f"{kind}_score_ci_low"], row[f"{kind}_score_ci_high"]
            cells.append("–" if low is None else f"[{_number(low)}, {_number(high)}]")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\n## Verdicts\n")
    found = comparisons(points)
    for pairs in found.values():
        for comparison in pairs.values():
            gap, kl_range = comparison.mean_gap, comparison.kl_range
            if gap is None or kl_range is None:
                extra = ""
            elif kl_range[1] > kl_range[0]:
                extra = f" (mean gap {gap:+.3f} over that range)"
            else:
                extra = f" (gap {gap:+.3f} there)"
            lines.append(f"- {comparison.verdict}{extra}.")
    if not any(found.values()):
        lines.append("- Only one method has points: nothing to compare.")
    fits = gao_fits(points)
    if fits:
        lines += [
            "\n## Gao et al.'s fits\n",
            "Score gain over SFT against d = √KL (Gao, Schulman & Hilton 2023): best-of-n "
            "d(α − βd), DPO and PPO d(α − β log d), by least squares; the peak is where the "
            "fitted curve turns down (– when it does not within twice the measured d).\n",
            "| method | score | form | α | β | R² | peak KL |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for (method, kind), fit in fits.items():
            cells = [METHOD_NAMES.get(method, method), kind, fit.form]
            cells += [_number(fit.alpha), _number(fit.beta), _number(fit.r_squared)]
            cells.append(_number(fit.peak_kl, 2))
            lines.append("| " + " | ".join(cells) + " |")
    if alarms := grid_alarms(points):
        lines += [
            "\n## Overoptimisation along each grid\n",
            "Each method's points in order of KL, read as one run: the alarm fires where, over "
            f"{DEFAULT_WINDOW} consecutive points, the RM score's fitted change is above "
            f"+{DEFAULT_EPSILON:g} while the gold score's is below −{DEFAULT_EPSILON:g}.\n",
            "| method | points | alarm | at KL | RM change | gold change |",
            "| --- | ---: | --- | ---: | ---: | ---: |",
        ]
        groups = by_method(points)
        for method, alarm in alarms.items():
            cells = [METHOD_NAMES.get(method, method), str(len(groups[method]))]
            cells += [alarm.status, _number(alarm.first_step, 2)]
            cells += [_number(alarm.proxy_change), _number(alarm.gold_change)]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "\nPoint estimates decide a verdict; where the intervals of two frontiers overlap, "
        "more held-out prompts (`sweep.eval_prompts`, `evaluate.samples_per_prompt`) would "
        "be needed to call it.\n"
    )
    return "\n".join(lines)


def frontier_figure(
    points: Sequence[FrontierPoint], *, title: str = "Reward–KL frontier"
) -> Figure:
    """Score against KL to SFT, one panel per score kind present (gold, then reward model).

    Each point has error bars: its score's 95% interval vertically and its KL's standard
    error horizontally. DPO and PPO points are scattered with their Pareto frontier drawn
    through them; best-of-n is drawn as a line in order of n, the baseline an RL method must
    beat (Gao et al. 2023, arXiv:2210.10760).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = scores_present(points)
    if not kinds:
        raise ValueError("no sweep point has a finite score to plot.")
    figure = Figure(figsize=(6.0 * len(kinds), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(kinds), squeeze=False)[0]
    for axes, kind in zip(panels, kinds, strict=True):
        _frontier_panel(axes, points, kind)
    figure.suptitle(title)
    return figure


def _frontier_panel(axes: Axes, points: Sequence[FrontierPoint], kind: Score) -> None:
    for method, group in by_method(points).items():
        colour = METHOD_COLOURS.get(method, "C3")
        name = METHOD_NAMES.get(method, method)
        if method == "best_of_n":
            group = sorted(group, key=lambda point: point.value)
        # Every point has this kind's estimate (`scores_present`).
        estimates = [p.gold if kind == "gold" else p.rm for p in group]
        means = [e.mean for e in estimates if e is not None]
        axes.errorbar(
            [p.kl for p in group],
            means,
            yerr=[
                [max(e.mean - e.low, 0.0) for e in estimates if e is not None],
                [max(e.high - e.mean, 0.0) for e in estimates if e is not None],
            ],
            xerr=[p.kl_stderr or 0.0 for p in group],
            fmt="o-" if method == "best_of_n" else "o",
            color=colour,
            capsize=3,
            markersize=5,
            linewidth=1.2,
            label=name,
        )
        front = pareto_front(group, kind)
        if method != "best_of_n" and len(front) >= 2:
            axes.plot(
                [p.kl for p in front],
                [p.score(kind) for p in front],
                linestyle="--",
                color=colour,
                linewidth=1.0,
                label=f"{name} frontier",
            )
        for point in group:
            axes.annotate(
                f"{point.parameter}={point.value:g}",
                (point.kl, point.score(kind) or 0.0),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    axes.set_xlabel("KL to SFT (nats)")
    axes.set_ylabel(SCORE_LABELS[kind])
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
