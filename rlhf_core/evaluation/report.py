"""Evaluation reports: comparison tables, reward-vs-KL and training-curve figures, sample tables.

Pure functions from numbers and texts to a markdown string, a pandas DataFrame, a matplotlib
Figure or a plot file for DVC; the caller saves or logs them (e.g. `mlflow.log_figure`).
Figures are built on matplotlib's Agg canvas without pyplot, so nothing global is touched and
nothing needs closing. matplotlib and pandas are imported inside the functions that use them.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MISSING = "–"  # how a table shows a value a policy does not have
BEST_OF_N_NAME = re.compile(r"^bon_(\d+)$")  # best-of-n policies are named bon_<n>

_AXIS_LABELS = {
    "kl_to_sft": "KL to SFT (nats)",
    "gold_score_mean": "mean gold score",
    "rm_score_mean": "mean reward-model score",
    "gold_win_rate_vs_sft": "gold win rate vs SFT",
    "rm_win_rate_vs_sft": "reward-model win rate vs SFT",
    "mean_length": "mean length (words)",
}

Curves = Mapping[str, Sequence[tuple[int, float]]]  # series name -> [(step, value), ...]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A table cell: ints as ints, other numbers with 3 decimals, None or NaN as "–".

    Strings are escaped for a markdown table (`|` and line breaks).
    """
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value.replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (hasattr(value, "dtype") and value.dtype.kind in "iu"):
        return str(int(value))
    number = float(value)
    return MISSING if math.isnan(number) else f"{number:.3f}"


def _markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]
) -> str:
    """A GitHub markdown table; numeric columns are right-aligned."""
    lines = [
        "| " + " | ".join(format_value(name) for name in header) + " |",
        "| " + " | ".join("---:" if right else "---" for right in numeric) + " |",
    ]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def comparison_table_markdown(
    results: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str] | None = None,
    *,
    policies: Sequence[str] | None = None,
) -> str:
    """A GitHub markdown table of metrics by policy: one row per policy, one column per metric.

    Args:
        results: {policy: {metric: value}}, e.g. `summarise_policy` output for each policy.
        metrics: the columns, in order; by default every metric found, in first-seen order.
        policies: the rows, in order; by default the order of `results`.

    Returns:
        The table, ending in a newline. Ints show as ints, other numbers with 3 decimals, and a
        metric a policy lacks (or a NaN) as "–".
    """
    if not results:
        raise ValueError("results is empty; give at least one policy's metrics.")
    rows_order = list(results) if policies is None else list(policies)
    unknown = [name for name in rows_order if name not in results]
    if unknown:
        raise ValueError(f"policies {unknown} have no entry in results ({list(results)}).")
    if metrics is None:
        metrics = list(dict.fromkeys(name for policy in rows_order for name in results[policy]))
    rows = [
        [format_value(policy)] + [format_value(results[policy].get(name)) for name in metrics]
        for policy in rows_order
    ]
    return _markdown_table(["policy", *metrics], rows, [False] + [True] * len(metrics))


# --------------------------------------------------------------------------------------------
# Sample responses
# --------------------------------------------------------------------------------------------


def prompt_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """A prompt as plain text: a string as is, one message as its content, several as
    "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if len(messages) == 1:
        return str(messages[0]["content"])
    return "\n".join(f"{message['role']}: {message['content']}" for message in messages)


def samples_table(
    prompts: Sequence[str | Sequence[Mapping[str, Any]]],
    responses_by_policy: Mapping[str, Sequence[str]],
    scores_by_policy: Mapping[str, Sequence[float]] | None = None,
    limit: int | None = 20,
) -> pd.DataFrame:
    """Side-by-side sample responses: one row per prompt, one column per policy.

    Columns: `prompt`, then for each policy (in the order of `responses_by_policy`) its
    response and, when `scores_by_policy` has it, `<policy>_score`. Rows are the first
    `limit` prompts (all when `limit` is None), so the same prompts appear in every report.

    Args:
        prompts: (prompts,) strings or canonical message lists.
        responses_by_policy: {policy: (prompts,) responses in prompt order}.
        scores_by_policy: {policy: (prompts,) a score for each response}, optional.
        limit: the most rows to keep.
    """
    import pandas as pd

    scores_by_policy = scores_by_policy or {}
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None but is {limit!r}.")
    if not responses_by_policy:
        raise ValueError("responses_by_policy is empty; give at least one policy's responses.")
    unscored = [name for name in scores_by_policy if name not in responses_by_policy]
    if unscored:
        raise ValueError(f"scores_by_policy has policies {unscored} without responses.")
    for kind, by_policy in (("responses", responses_by_policy), ("scores", scores_by_policy)):
        for policy, values in by_policy.items():
            if len(values) != len(prompts):
                raise ValueError(
                    f"policy {policy!r} has {len(values)} {kind} but there are {len(prompts)} "
                    "prompts; give one per prompt, in prompt order."
                )
    keep = len(prompts) if limit is None else min(limit, len(prompts))
    columns: dict[str, list[Any]] = {"prompt": [prompt_text(p) for p in prompts[:keep]]}
    for policy, responses in responses_by_policy.items():
        _add_column(columns, policy, list(responses[:keep]))
        if policy in scores_by_policy:
            scores = [float(score) for score in scores_by_policy[policy][:keep]]
            _add_column(columns, f"{policy}_score", scores)
    return pd.DataFrame(columns)


def _add_column(columns: dict[str, list[Any]], name: str, values: list[Any]) -> None:
    if name in columns:
        raise ValueError(f"two samples-table columns would be named {name!r}; rename a policy.")
    columns[name] = values


def _clip(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[: max_chars - 1].rstrip() + "…"


def samples_markdown(
    prompts: Sequence[str | Sequence[Mapping[str, Any]]],
    responses_by_policy: Mapping[str, Sequence[str]],
    scores_by_policy: Mapping[str, Sequence[float]] | None = None,
    limit: int | None = 20,
    max_chars: int | None = 300,
) -> str:
    """`samples_table` as a GitHub markdown table, texts clipped to `max_chars` characters."""
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be a positive integer or None but is {max_chars!r}.")
    table = samples_table(prompts, responses_by_policy, scores_by_policy, limit)
    numeric = [column.endswith("_score") for column in table.columns]
    rows = [
        [
            format_value(value) if is_number else format_value(_clip(value, max_chars))
            for value, is_number in zip(row, numeric, strict=True)
        ]
        for row in table.itertuples(index=False)
    ]
    return _markdown_table(list(table.columns), rows, numeric)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _new_figure(figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """A figure with one axes on the Agg canvas (no pyplot, so no global figure registry)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def reward_vs_kl_figure(
    results: Mapping[str, Mapping[str, float]],
    x: str = "kl_to_sft",
    y: str = "gold_score_mean",
    *,
    title: str | None = None,
    figsize: tuple[float, float] = (6.0, 4.5),
) -> Figure:
    """Scatter of each policy's `y` against its `x` (reward against KL), each point labelled.

    Policies named `bon_<n>` (best-of-n) are drawn in their own colour and, when there are
    two or more, joined in order of n by a line: the reward-KL frontier that RL policies are
    judged against (Gao et al. 2023, arXiv:2210.10760). Policies without a finite `x` and `y`
    are left out.

    Returns:
        The figure (one axes: one scatter collection, one line per frontier, one label per
        point); save it with `figure.savefig(path)` or log it with `mlflow.log_figure`.
    """
    points = [
        (name, float(metrics[x]), float(metrics[y]))
        for name, metrics in results.items()
        if _is_number(metrics.get(x)) and _is_number(metrics.get(y))
    ]
    if not points:
        raise ValueError(f"no policy in results has finite values for both {x!r} and {y!r}.")
    best_of_n = sorted(
        (int(match.group(1)), px, py)
        for name, px, py in points
        if (match := BEST_OF_N_NAME.match(name))
    )
    figure, axes = _new_figure(figsize)
    if len(best_of_n) >= 2:
        axes.plot(
            [px for _, px, _ in best_of_n],
            [py for _, _, py in best_of_n],
            color="C1",
            linewidth=1.2,
            zorder=1,
            label="best-of-n",
        )
    colours = ["C1" if BEST_OF_N_NAME.match(name) else "C0" for name, _, _ in points]
    axes.scatter([px for _, px, _ in points], [py for _, _, py in points], c=colours, zorder=2)
    for name, px, py in points:
        axes.annotate(name, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel(_AXIS_LABELS.get(x, x))
    axes.set_ylabel(_AXIS_LABELS.get(y, y))
    axes.set_title(title or f"{_AXIS_LABELS.get(y, y)} vs {_AXIS_LABELS.get(x, x)}")
    axes.grid(alpha=0.3)
    return figure


def curves_figure(
    history: Curves,
    title: str,
    *,
    y_label: str | None = None,
    figsize: tuple[float, float] = (6.0, 4.0),
) -> Figure:
    """Line plot of training curves: one line per series, step on x, with a legend.

    Args:
        history: {series name: [(step, value), ...]}, e.g. {"loss": [(0, 0.69), (10, 0.52)]}.
        title: the figure's title, e.g. "DPO training".
        y_label: label of the y axis; by default the series name when there is only one.
    """
    if not history:
        raise ValueError("history is empty; give at least one series of (step, value) points.")
    from matplotlib.ticker import MaxNLocator

    figure, axes = _new_figure(figsize)
    for name, points in history.items():
        ordered = sorted(points)
        axes.plot(
            [step for step, _ in ordered],
            [value for _, value in ordered],
            label=name,
            marker="o" if len(ordered) == 1 else None,  # a lone point draws no line
        )
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes.set_ylabel(y_label or (next(iter(history)) if len(history) == 1 else "value"))
    axes.set_title(title)
    axes.legend()
    axes.grid(alpha=0.3)
    return figure


# --------------------------------------------------------------------------------------------
# Curves as files for DVC plots
# --------------------------------------------------------------------------------------------


def curve_rows(history: Curves) -> list[dict[str, int | float | None]]:
    """Curves as rows for a plots file: one row per step, `step` plus one key per series.

    Rows are sorted by step. Every row has every series key (None where a series has no value
    at that step, e.g. an eval metric logged less often than the loss), because DVC reads the
    field names of a plots file from its first row.
    """
    if "step" in history:
        raise ValueError("a series is named 'step', which is the name of the step column.")
    values_by_step: dict[int, dict[str, float]] = {}
    for name, points in history.items():
        for step, value in points:
            at_step = values_by_step.setdefault(int(step), {})
            if name in at_step:
                raise ValueError(f"series {name!r} has two values at step {int(step)}.")
            at_step[name] = float(value)
    return [
        {"step": step, **{name: values_by_step[step].get(name) for name in history}}
        for step in sorted(values_by_step)
    ]


def write_curves_csv(history: Curves, path: str | Path) -> Path:
    """Write `curve_rows(history)` as CSV (header `step,<series>...`; a missing value is empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", *history])
        writer.writeheader()
        writer.writerows(curve_rows(history))
    return path


def write_curves_json(history: Curves, path: str | Path) -> Path:
    """Write `curve_rows(history)` as a JSON list of objects; missing or non-finite values are null.

    Point `dvc plots` at the file with `x: step` and one of the series as `y`.
    """
    rows = [
        {key: value if _is_number(value) else None for key, value in row.items()}
        for row in curve_rows(history)
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return path
