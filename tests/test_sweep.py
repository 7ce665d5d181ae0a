"""`rlhf sweep`: the frontier math on constructed points, the grid and its dvc commands and
the checks before a sweep. A real sweep through DVC's experiment queue runs in
tests/test_pipeline_end_to_end.py, on the project whose SFT and reward model the pipeline
there built."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from rlhf_core.app.cli import app
from rlhf_core.config import ParamsError, parse_params
from rlhf_core.config.sweep import SweepSettings
from rlhf_core.evaluation.frontier import (
    FrontierPoint,
    ScoreEstimate,
    compare_fronts,
    frontier_score,
    pareto_front,
    score_estimate,
)
from rlhf_core.evaluation.frontier_report import (
    frontier_figure,
    frontier_markdown,
    frontier_rows,
)
from rlhf_core.orchestration.sweep import (
    check_project,
    experiment_command,
    experiment_states,
    sweep_commands,
    sweep_points,
    untracked_inputs,
)
from rlhf_core.orchestration.sweep_results import SweepError

REPO = Path(__file__).resolve().parents[1]


def point(method: str, kl: float, gold: float, *, value: float = 1.0, rm: float | None = None):
    """A frontier point with a ±0.1 interval on each score."""
    reward = gold if rm is None else rm
    return FrontierPoint(
        method=method,
        parameter={"dpo": "beta", "ppo": "target_kl"}.get(method, "n"),
        value=value,
        kl=kl,
        kl_stderr=0.05 if method != "best_of_n" else None,
        gold=ScoreEstimate(gold, gold - 0.1, gold + 0.1),
        rm=ScoreEstimate(reward, reward - 0.1, reward + 0.1),
        experiment=f"exp-{method}-{value:g}",
    )


# --------------------------------------------------------------------------------------------
# Frontier math
# --------------------------------------------------------------------------------------------


def test_pareto_front_keeps_only_points_no_other_beats_at_less_kl():
    points = [
        point("dpo", 1.0, 0.2, value=0.5),
        point("dpo", 2.0, 0.1, value=0.2),  # more KL, lower score than (1, 0.2): dominated
        point("dpo", 3.0, 0.5, value=0.1),
        point("dpo", 0.5, 0.0, value=1.0),
        point("dpo", 3.0, 0.4, value=0.05),  # same KL as (3, 0.5), lower: dominated
    ]
    front = pareto_front(points, "gold")
    assert [(p.kl, p.score("gold")) for p in front] == [(0.5, 0.0), (1.0, 0.2), (3.0, 0.5)]


def test_frontier_score_interpolates_holds_its_best_and_is_undefined_below_its_first_kl():
    front = pareto_front([point("dpo", 1.0, 0.0), point("dpo", 3.0, 1.0)], "gold")
    assert frontier_score(front, "gold", 2.0) == pytest.approx(0.5)
    assert frontier_score(front, "gold", 10.0) == 1.0
    assert frontier_score(front, "gold", 0.5) is None


def test_a_frontier_above_everywhere_dominates_and_the_other_is_dominated():
    dpo = [point("dpo", 1.0, 0.5), point("dpo", 2.0, 0.8), point("dpo", 4.0, 0.9)]
    ppo = [point("ppo", 1.0, 0.3), point("ppo", 3.0, 0.6), point("ppo", 4.0, 0.7)]
    ahead = compare_fronts(dpo, ppo, "gold")
    assert ahead.kind == "dominates"
    assert ahead.verdict.startswith("DPO's frontier dominates PPO's")
    assert ahead.kl_range == (1.0, 4.0)
    # DPO − PPO at the corners 1, 2, 3, 4: 0.2, 0.35, 0.25, 0.2; trapezoids / width 3.
    assert ahead.mean_gap == pytest.approx((0.275 + 0.3 + 0.225) / 3)
    assert ahead.crossings == ()
    behind = compare_fronts(ppo, dpo, "gold", ("PPO", "DPO"))
    assert behind.kind == "dominated"
    assert "PPO's frontier does not dominate DPO's" in behind.verdict
    assert behind.mean_gap == pytest.approx(-ahead.mean_gap)


def test_frontiers_that_cross_say_where():
    # DPO better at small KL, PPO at large: gap +0.2 at KL 1, −0.2 at KL 3 -> crosses at 2.
    dpo = [point("dpo", 1.0, 0.5), point("dpo", 3.0, 0.5)]
    ppo = [point("ppo", 1.0, 0.3), point("ppo", 3.0, 0.7)]
    comparison = compare_fronts(dpo, ppo, "gold")
    assert comparison.kind == "cross"
    assert comparison.crossings == pytest.approx((2.0,))
    assert "cross (at KL ≈ 2)" in comparison.verdict
    assert comparison.mean_gap == pytest.approx(0.0)


def test_equal_within_tolerance_and_an_empty_frontier_cannot_be_compared():
    dpo = [point("dpo", 1.0, 0.50), point("dpo", 2.0, 0.60)]
    ppo = [point("ppo", 1.0, 0.49), point("ppo", 2.0, 0.61)]
    assert compare_fronts(dpo, ppo, "gold").kind == "cross"
    assert compare_fronts(dpo, ppo, "gold", tolerance=0.02).kind == "equal"
    empty = compare_fronts(dpo, [], "gold")
    assert empty.kind == "incomparable" and empty.mean_gap is None


def test_a_frontier_reaching_less_kl_with_more_score_dominates_one_far_out():
    # No KL in common: past its last point DPO keeps its best score, which beats PPO's.
    dpo = [point("dpo", 0.5, 0.9)]
    ppo = [point("ppo", 4.0, 0.6), point("ppo", 8.0, 0.8)]
    assert compare_fronts(dpo, ppo, "gold").kind == "dominates"


def test_score_estimate_resamples_whole_prompts():
    scores = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    by_response = score_estimate(scores, seed=0)
    by_prompt = score_estimate(scores, [0, 0, 1, 1, 2, 2], seed=0)
    assert by_response.mean == by_prompt.mean == pytest.approx(0.5)
    assert by_response.low <= 0.5 <= by_response.high
    # Two answers to one prompt agree, so prompts vary more than responses: a wider interval.
    assert by_prompt.high - by_prompt.low >= by_response.high - by_response.low


def test_reports_show_every_point_with_intervals_and_the_verdict():
    points = [
        point("dpo", 1.0, 0.5, value=0.1),
        point("dpo", 2.0, 0.6, value=0.05),
        point("dpo", 2.5, 0.55, value=0.02),  # more KL, less score than beta 0.05
        point("ppo", 1.5, 0.2, value=2.0),
        point("best_of_n", 0.0, 0.1, value=1),
        point("best_of_n", 0.19, 0.25, value=2),
    ]
    rows = frontier_rows(points)
    assert [row["on_gold_frontier"] for row in rows] == [True, True, False, True, True, True]
    assert rows[0]["gold_score_ci_low"] == pytest.approx(0.4)
    assert rows[4]["kl_to_sft_stderr"] is None
    markdown = frontier_markdown(points, num_prompts=8)
    assert "8 held-out prompts" in markdown
    # DPO − PPO: 0.55 − 0.2 at KL 1.5 (PPO's first point), 0.6 − 0.2 at KL 2.
    assert (
        "DPO's frontier dominates PPO's on gold score over KL 1.5–2 nats (mean gap +0.375 over "
        "that range)" in markdown
    )
    assert (
        "| DPO | beta | 0.1 | exp-dpo-0.1 | 1.000 | 0.050 | 0.500* | [0.400, 0.600] |" in markdown
    )
    figure = frontier_figure(points)
    gold_panel, rm_panel = figure.axes
    assert gold_panel.get_ylabel() == "mean gold score"
    assert rm_panel.get_ylabel() == "mean reward-model score"
    # One error-bar container per method, and DPO's two-point frontier as a dashed line.
    assert len(gold_panel.containers) == 3
    assert any(line.get_label() == "DPO frontier" for line in gold_panel.get_lines())


def test_gao_fits_recover_each_methods_curve_from_the_sft_point():
    """Points placed exactly on Gao et al.'s curves (gain over SFT's 0.1 against d = √KL):
    best-of-n on d(0.6 − 0.15d), PPO on d(0.5 − 0.2 log d); DPO has a single point, no fit."""
    from rlhf_core.evaluation.frontier_report import gao_fits

    sft = 0.1
    bon = [point("best_of_n", 0.0, sft, value=1)]
    for n, kl in ((4, 0.636), (16, 1.835), (64, 3.175)):
        d = math.sqrt(kl)
        bon.append(point("best_of_n", kl, sft + d * (0.6 - 0.15 * d), value=n))
    ppo = []
    for target, kl in ((1, 1.2), (4, 4.5), (8, 9.0)):
        d = math.sqrt(kl)
        ppo.append(point("ppo", kl, sft + d * (0.5 - 0.2 * math.log(d)), value=target))
    points = [*bon, *ppo, point("dpo", 2.0, 0.7, value=0.1)]
    fits = gao_fits(points)
    assert set(fits) == {("best_of_n", "gold"), ("best_of_n", "rm"), ("ppo", "gold"), ("ppo", "rm")}
    bon_fit, ppo_fit = fits[("best_of_n", "gold")], fits[("ppo", "gold")]
    assert bon_fit.form == "bon"
    assert (bon_fit.alpha, bon_fit.beta) == (pytest.approx(0.6), pytest.approx(0.15))
    assert bon_fit.peak_kl == pytest.approx((0.6 / 0.3) ** 2)
    assert ppo_fit.form == "rl"
    assert (ppo_fit.alpha, ppo_fit.beta) == (pytest.approx(0.5), pytest.approx(0.2))
    markdown = frontier_markdown(points, num_prompts=8)
    assert "## Gao et al.'s fits" in markdown
    assert "| best-of-n | gold | bon | 0.600 | 0.150 | 1.000 | 4.00 |" in markdown
    # Without the SFT point (best-of-1 at KL 0) there is no R₀ and no fit.
    assert gao_fits(points[1:]) == {}


def test_the_alarm_along_a_grid_fires_where_the_rm_score_rises_while_gold_falls():
    """DPO's β grid read in order of KL: gold peaks at KL 3 and falls while the RM score keeps
    rising, so the alarm fires at the point that closes the first such window (KL 8); PPO's
    points rise on both and stay silent; without gold there is nothing to judge by."""
    from rlhf_core.evaluation.frontier_report import grid_alarms

    dpo = [
        point("dpo", kl, gold, value=beta, rm=rm)
        for beta, kl, gold, rm in (
            (0.5, 1.0, 0.50, 1.0),
            (0.2, 3.0, 0.70, 1.5),
            (0.1, 5.0, 0.60, 2.0),
            (0.05, 8.0, 0.45, 2.6),
        )
    ]
    ppo = [point("ppo", kl, 0.4 + 0.05 * kl, value=kl, rm=kl) for kl in (1.0, 2.0, 4.0)]
    alarms = grid_alarms([*ppo, *reversed(dpo)])  # any order: points are sorted by KL
    assert alarms["dpo"].fired and alarms["dpo"].first_step == 8.0
    assert alarms["dpo"].proxy_change > 0.05 and alarms["dpo"].gold_change < -0.05
    assert not alarms["ppo"].fired and alarms["ppo"].status == "silent"
    markdown = frontier_markdown([*dpo, *ppo], num_prompts=8)
    assert "## Overoptimisation along each grid" in markdown
    assert "| DPO | 4 | fired | 8.00 |" in markdown and "| PPO | 3 | silent | – |" in markdown
    no_gold = [dataclasses.replace(p, gold=None) for p in dpo]
    assert grid_alarms(no_gold) == {}
    assert "Overoptimisation along" not in frontier_markdown(no_gold, num_prompts=8)


# --------------------------------------------------------------------------------------------
# Settings, grid and commands
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"dpo_betas": [0.1, -1]}, "sweep.dpo_betas must hold only finite numbers > 0"),
        ({"ppo_target_kls": [2, 2]}, "sweep.ppo_target_kls lists a value twice"),
        ({"dpo_betas": [], "ppo_target_kls": []}, "both empty"),
        ({"best_of_n": [0, 2]}, "sweep.best_of_n must hold distinct integers >= 1"),
        ({"eval_prompts": 0}, "sweep.eval_prompts must be an integer >= 1 or null"),
        ({"jobs": 0}, "sweep.jobs must be an integer >= 1"),
        ({"betas": [0.1]}, "sweep.betas: unknown key"),
    ],
)
def test_each_bad_sweep_key_is_one_error_line(section, message):
    with pytest.raises(ParamsError, match=message) as raised:
        parse_params({"sweep": section})
    assert "\n" not in str(raised.value)


def test_the_grid_trains_one_method_per_experiment_and_draws_best_of_n_once():
    sweep = SweepSettings(dpo_betas=(0.05, 0.5), ppo_target_kls=(1, 8), best_of_n=(1, 2, 4))
    points = sweep_points(sweep, eval_prompts=16, stamp="20260101-000000")
    assert [(p.method, p.parameter, p.value) for p in points] == [
        ("dpo", "beta", 0.05),
        ("dpo", "beta", 0.5),
        ("ppo", "target_kl", 1.0),
        ("ppo", "target_kl", 8.0),
    ]
    assert points[0].overrides == (
        "policy.algorithms=[dpo]",
        "policy.dpo.beta=0.05",
        "evaluate.best_of_n=[2,4]",
        "evaluate.max_prompts=16",
    )
    assert points[2].overrides == (
        "policy.algorithms=[ppo]",
        "policy.ppo.train.target_kl=1.0",
        "policy.ppo.train.adaptive_kl=true",
        "evaluate.best_of_n=[]",
        "evaluate.max_prompts=16",
    )
    assert points[3].name == "sweep-20260101-000000-ppo-target_kl-8"
    for name in {p.name for p in points}:  # every name is a valid git ref, as DVC requires
        check = subprocess.run(["git", "check-ref-format", f"refs/exps/{name}"])
        assert check.returncode == 0, name

    commands = sweep_commands(points, queue=True, jobs=2, copy_paths=["data/preferences"])
    assert commands[0] == ["repro", "reward"]
    assert commands[1] == [
        "exp", "run", "--queue", "-n", points[0].name, "-C", "data/preferences",
        "-S", "policy.algorithms=[dpo]", "-S", "policy.dpo.beta=0.05",
        "-S", "evaluate.best_of_n=[2,4]", "-S", "evaluate.max_prompts=16",
    ]  # fmt: skip
    assert commands[-1] == ["exp", "run", "--run-all", "--jobs", "2"]
    assert len(commands) == 6
    one_by_one = sweep_commands(points, queue=False, jobs=1)
    assert len(one_by_one) == 5 and one_by_one[1][:3] == ["exp", "run", "--temp"]
    assert experiment_command(points[1], queue=False)[-4:-2] == ["-S", "evaluate.best_of_n=[]"]


def test_untracked_stage_inputs_are_copied_into_the_temporary_workspace():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    exists = {"data/preferences", "data/raw", "artifacts/sft", "rlhf_core/stages/sft.py"}
    tracked = {"rlhf_core/stages/sft.py"}
    # data/raw and artifacts/sft are stage outputs; the code is in git; the store is neither.
    assert untracked_inputs(dvc_yaml, tracked, exists) == ["data/preferences"]
    assert untracked_inputs(dvc_yaml, tracked | {"data/preferences.dvc"}, exists) == []
    assert untracked_inputs(dvc_yaml, tracked, exists - {"data/preferences"}) == []


def test_experiment_states_read_dvc_exp_show():
    show = [
        {"rev": "workspace", "name": None, "data": {}, "experiments": None},
        {
            "rev": "abc",
            "name": "main",
            "experiments": [
                {
                    "name": "sweep-x-dpo-beta-0.1",
                    "executor": {"state": "failed", "local": {"log": "/p/x.out"}},
                    "revs": [{"rev": "111", "name": "sweep-x-dpo-beta-0.1", "data": {}}],
                },
                {
                    "name": "sweep-x-ppo-target_kl-1",
                    "executor": None,
                    "revs": [
                        {
                            "rev": "222",
                            "data": {"metrics": {"m.json": {"data": {"ppo": {"kl_to_sft": 1}}}}},
                        }
                    ],
                },
            ],
        },
    ]
    states = experiment_states(show)
    assert states["sweep-x-dpo-beta-0.1"]["state"] == "failed"
    assert states["sweep-x-dpo-beta-0.1"]["log"] == "/p/x.out"
    assert states["sweep-x-ppo-target_kl-1"] == {
        "state": "success",
        "rev": "222",
        "log": None,
        "metrics": {"m.json": {"ppo": {"kl_to_sft": 1}}},
    }


def test_dry_run_prints_the_grid_and_the_dvc_commands():
    result = CliRunner().invoke(app, ["sweep", "--dry-run", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Sweep: 9 points, best-of-n [1, 2, 4, 8, 16, 32, 64]"
    queued = [line for line in lines if line.strip().startswith("dvc exp run --queue")]
    assert len(queued) == 9
    assert "'evaluate.best_of_n=[2,4,8,16,32,64]'" in queued[0]
    assert lines[-1].strip() == "dvc exp run --run-all --jobs 1"


def _git(root: Path, *arguments: str) -> None:
    subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *arguments],
        cwd=root,
        check=True,
        capture_output=True,
    )


def test_a_project_without_git_dvc_a_commit_or_committed_params_is_refused(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    with pytest.raises(SweepError, match="is not a git repository"):
        check_project(root)
    _git(root, "init", "-q")
    with pytest.raises(SweepError, match="run `dvc init`"):
        check_project(root)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    with pytest.raises(SweepError, match="no git commit yet"):
        check_project(root)
    (root / "dvc.yaml").write_text("stages: {}\n")
    _git(root, "add", "dvc.yaml", ".dvc")
    _git(root, "commit", "-qm", "dvc")
    (root / "params.yaml").write_text("seed: 0\n")
    with pytest.raises(SweepError, match=r"params\.yaml is not committed"):
        check_project(root)
    _git(root, "add", "params.yaml")
    _git(root, "commit", "-qm", "params")
    check_project(root)
