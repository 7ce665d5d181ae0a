"""Tests for rlhf_core/evaluation/report.py: markdown, sample tables, figures and curve files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from rlhf_core.evaluation.report import (
    comparison_table_markdown,
    curve_rows,
    curves_figure,
    format_value,
    prompt_text,
    reward_vs_kl_figure,
    samples_markdown,
    samples_table,
    write_curves_csv,
    write_curves_json,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------------------------
# comparison table
# --------------------------------------------------------------------------------------------


def test_comparison_table_exact_string():
    results = {
        "sft": {"gold_score_mean": 0.12345, "num_prompts": 200},
        "dpo": {"gold_score_mean": 0.5, "kl_to_sft": 1.23456},
    }
    assert comparison_table_markdown(results) == (
        "| policy | gold_score_mean | num_prompts | kl_to_sft |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| sft | 0.123 | 200 | – |\n"
        "| dpo | 0.500 | – | 1.235 |\n"
    )


def test_comparison_table_follows_the_given_orders():
    results = {"sft": {"a": 1.0, "b": 2.0}, "ppo": {"a": 3.0, "b": float("nan")}}
    table = comparison_table_markdown(results, metrics=["b", "a"], policies=["ppo", "sft"])
    lines = table.splitlines()
    assert lines[0] == "| policy | b | a |"
    assert lines[2] == "| ppo | – | 3.000 |"
    assert lines[3] == "| sft | 2.000 | 1.000 |"


def test_comparison_table_rejects_unknown_policies_and_empty_results():
    with pytest.raises(ValueError, match="no entry"):
        comparison_table_markdown({"sft": {"a": 1.0}}, policies=["dpo"])
    with pytest.raises(ValueError, match="empty"):
        comparison_table_markdown({})


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        (3, "3"),
        (np.int64(7), "7"),
        (0.1 + 0.2, "0.300"),
        (np.float32(2.5), "2.500"),
        (-1.0, "-1.000"),
        (None, "–"),
        (float("nan"), "–"),
        ("a|b\nc", "a\\|b<br>c"),
    ],
)
def test_format_value(value, cell):
    assert format_value(value) == cell


# --------------------------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------------------------

PROMPTS = [
    "Review the film Alpha.",
    [{"role": "user", "content": "Review the film Beta."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Review the film Gamma."},
    ],
]
RESPONSES = {
    "sft": ["Alpha was fine.", "Beta was dull.", "Gamma was long."],
    "dpo": ["Alpha was great!", "Beta | a gem.", "Gamma dazzles."],
}
SCORES = {"dpo": [0.9, 0.8, 0.7]}


def test_prompt_text_renders_strings_and_messages():
    assert prompt_text(PROMPTS[0]) == "Review the film Alpha."
    assert prompt_text(PROMPTS[1]) == "Review the film Beta."
    assert prompt_text(PROMPTS[2]) == "system: Be brief.\nuser: Review the film Gamma."


def test_samples_table_columns_rows_and_limit():
    table = samples_table(PROMPTS, RESPONSES, SCORES, limit=2)
    assert list(table.columns) == ["prompt", "sft", "dpo", "dpo_score"]
    assert len(table) == 2
    assert table["prompt"].tolist() == ["Review the film Alpha.", "Review the film Beta."]
    assert table["dpo"].tolist() == RESPONSES["dpo"][:2]
    assert table["dpo_score"].tolist() == pytest.approx([0.9, 0.8])
    assert len(samples_table(PROMPTS, RESPONSES, limit=None)) == 3
    assert len(samples_table(PROMPTS, RESPONSES, limit=50)) == 3


def test_samples_table_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="'sft' has 2 responses but there are 3 prompts"):
        samples_table(PROMPTS, {"sft": ["a", "b"]})
    with pytest.raises(ValueError, match="without responses"):
        samples_table(PROMPTS, RESPONSES, {"ppo": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="limit"):
        samples_table(PROMPTS, RESPONSES, limit=0)
    clashing = {"x": ["a"] * 3, "x_score": ["b"] * 3}
    with pytest.raises(ValueError, match="'x_score'"):
        samples_table(PROMPTS, clashing, {"x": [1.0, 2.0, 3.0]})


def test_samples_markdown_escapes_clips_and_formats():
    text = samples_markdown(PROMPTS, RESPONSES, SCORES, limit=3, max_chars=12)
    lines = text.splitlines()
    assert len(lines) == 2 + 3
    assert lines[0] == "| prompt | sft | dpo | dpo_score |"
    assert lines[1] == "| --- | --- | --- | ---: |"
    assert lines[2] == "| Review the… | Alpha was f… | Alpha was g… | 0.900 |"
    assert "| Beta \\| a ge… |" in lines[3]  # clipped to 12 characters, then escaped
    assert lines[4].startswith("| system: Be… |")
    unclipped = samples_markdown(PROMPTS, RESPONSES, max_chars=None)
    assert "| system: Be brief.<br>user: Review the film Gamma. |" in unclipped


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------

RESULTS = {
    "sft": {"kl_to_sft": 0.0, "gold_score_mean": 0.10},
    "bon_8": {"kl_to_sft": 1.2, "gold_score_mean": 0.45},
    "dpo": {"kl_to_sft": 2.0, "gold_score_mean": 0.40},
    "bon_2": {"kl_to_sft": 0.19, "gold_score_mean": 0.25},
    "bon_4": {"kl_to_sft": 0.64, "gold_score_mean": 0.35},
    "ppo": {"gold_score_mean": 0.5},  # no KL: not drawn
}


def test_reward_vs_kl_figure_scatters_labels_and_joins_best_of_n(tmp_path):
    figure = reward_vs_kl_figure(RESULTS)
    assert isinstance(figure, Figure)
    (axes,) = figure.axes
    (scatter,) = axes.collections
    offsets = np.asarray(scatter.get_offsets())
    assert offsets.shape == (5, 2)
    assert {tuple(point) for point in offsets.tolist()} == {
        (m["kl_to_sft"], m["gold_score_mean"]) for m in RESULTS.values() if "kl_to_sft" in m
    }
    assert sorted(text.get_text() for text in axes.texts) == [
        "bon_2",
        "bon_4",
        "bon_8",
        "dpo",
        "sft",
    ]
    (frontier,) = axes.lines
    assert frontier.get_xdata().tolist() == [0.19, 0.64, 1.2]  # ordered by n
    assert frontier.get_ydata().tolist() == [0.25, 0.35, 0.45]
    assert axes.get_xlabel() and axes.get_ylabel() and axes.get_title()
    path = tmp_path / "reward_vs_kl.png"
    figure.savefig(path)
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_reward_vs_kl_figure_other_axes_and_no_frontier():
    results = {
        "sft": {"kl_to_sft": 0.0, "rm_score_mean": 0.0},
        "bon_4": {"kl_to_sft": 0.6, "rm_score_mean": 1.0},
    }
    figure = reward_vs_kl_figure(results, y="rm_score_mean", title="RM reward vs KL")
    (axes,) = figure.axes
    assert len(axes.lines) == 0  # one best-of-n point is no frontier
    assert len(axes.collections[0].get_offsets()) == 2
    assert axes.get_title() == "RM reward vs KL"
    with pytest.raises(ValueError, match="'gold_score_mean'"):
        reward_vs_kl_figure(results)


def test_curves_figure_draws_one_line_per_series(tmp_path):
    history = {"loss": [(0, 0.7), (2, 0.4), (1, 0.5)], "reward": [(0, -0.1), (2, 0.3)]}
    figure = curves_figure(history, "DPO training")
    (axes,) = figure.axes
    assert [line.get_label() for line in axes.lines] == ["loss", "reward"]
    assert axes.lines[0].get_xdata().tolist() == [0, 1, 2]  # sorted by step
    assert axes.lines[0].get_ydata().tolist() == [0.7, 0.5, 0.4]
    assert axes.get_title() == "DPO training" and axes.get_xlabel() == "step"
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["loss", "reward"]
    path = tmp_path / "curves.png"
    figure.savefig(path)
    assert path.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="empty"):
        curves_figure({}, "nothing")


# --------------------------------------------------------------------------------------------
# curve rows and plot files
# --------------------------------------------------------------------------------------------

HISTORY = {"loss": [(0, 1.0), (1, 0.5), (2, 0.25)], "eval_reward": [(2, 0.3), (0, 0.1)]}


def test_curve_rows_structure():
    assert curve_rows(HISTORY) == [
        {"step": 0, "loss": 1.0, "eval_reward": 0.1},
        {"step": 1, "loss": 0.5, "eval_reward": None},
        {"step": 2, "loss": 0.25, "eval_reward": 0.3},
    ]
    assert curve_rows({"loss": []}) == []


def test_curve_rows_rejects_duplicates_and_a_step_series():
    with pytest.raises(ValueError, match="two values at step 1"):
        curve_rows({"loss": [(1, 0.5), (1, 0.4)]})
    with pytest.raises(ValueError, match="'step'"):
        curve_rows({"step": [(0, 1.0)]})


def test_write_curves_csv_and_json(tmp_path):
    csv_path = write_curves_csv(HISTORY, tmp_path / "plots" / "curves.csv")
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0] == {"step": "0", "loss": "1.0", "eval_reward": "0.1"}
    assert rows[1]["eval_reward"] == ""
    assert len(rows) == 3

    history = {"loss": [(0, 1.0), (1, math.nan)]}
    json_path = write_curves_json(history, tmp_path / "plots" / "curves.json")
    assert json.loads(json_path.read_text()) == [
        {"step": 0, "loss": 1.0},
        {"step": 1, "loss": None},  # NaN is not JSON
    ]
