"""Overoptimisation: Gao et al.'s fits, the alarm, and the alarm on real PPO runs."""

import math
import random

import numpy as np
import pytest
import torch
from tiny_models import FILM_WORDS, TINY_PPO_TRAIN, word_tokenizer

from rlhf_core.config.training import PPOTrainSettings
from rlhf_core.evaluation.overoptimisation import (
    NO_GOLD,
    best_of_n_fit,
    fit_gao,
    overoptimisation_alarm,
    overoptimisation_warning,
    run_overoptimisation,
    window_change,
)
from rlhf_core.models.heads import PolicyWithValueHead
from rlhf_core.models.tiny import build_tiny_llama
from rlhf_core.training.ppo_trainer import train_ppo
from rlhf_core.training.rollout import PPOModels

KL_GRID = np.linspace(0.0, 25.0, 26)


def gao_curve(form: str, kl, alpha: float, beta: float, initial: float = -0.3) -> np.ndarray:
    distance = np.sqrt(np.asarray(kl, dtype=float))
    if form == "bon":
        return initial + distance * (alpha - beta * distance)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_d = np.where(distance > 0, np.log(np.where(distance > 0, distance, 1.0)), 0.0)
    return initial + distance * (alpha - beta * log_d)


# ---------------------------------------------------------------------------------------------
# Fits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("form", "alpha", "beta"), [("bon", 0.9, 0.2), ("rl", 0.6, 0.35)])
def test_fits_recover_the_coefficients_of_an_exact_curve(form, alpha, beta):
    scores = gao_curve(form, KL_GRID, alpha, beta)
    fit = fit_gao(form, KL_GRID, scores)  # R0 read from the point at KL 0
    assert fit.alpha == pytest.approx(alpha, abs=1e-9)
    assert fit.beta == pytest.approx(beta, abs=1e-9)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12)
    assert fit.points == len(KL_GRID) - 1  # the point at d = 0 carries no information
    np.testing.assert_allclose(fit.predict(KL_GRID), scores - scores[0], atol=1e-9)


@pytest.mark.parametrize(("form", "alpha", "beta"), [("bon", 0.9, 0.2), ("rl", 0.6, 0.35)])
def test_fits_recover_the_coefficients_of_a_noisy_curve(form, alpha, beta):
    rng = np.random.default_rng(0)
    kl = np.repeat(KL_GRID[1:], 8)
    scores = gao_curve(form, kl, alpha, beta) + rng.normal(0.0, 0.05, kl.shape)
    fit = fit_gao(form, kl, scores, initial_score=-0.3)
    assert fit.alpha == pytest.approx(alpha, rel=0.05)
    assert fit.beta == pytest.approx(beta, rel=0.05)
    assert 0.9 < fit.r_squared < 1.0


def test_the_peak_is_where_the_fitted_curve_is_highest():
    bon = fit_gao("bon", KL_GRID, gao_curve("bon", KL_GRID, 1.0, 0.25))
    assert bon.peak_d == pytest.approx(2.0) and bon.peak_kl == pytest.approx(4.0)  # α / 2β
    rl = fit_gao("rl", KL_GRID, gao_curve("rl", KL_GRID, 1.0, 0.5))
    assert rl.peak_d == pytest.approx(math.e) and rl.peak_kl == pytest.approx(math.e**2)
    fine = np.linspace(0.0, 30.0, 30001)
    for fit in (bon, rl):
        assert fine[np.argmax(fit.predict(fine))] == pytest.approx(fit.peak_kl, abs=2e-3)


def test_a_curve_that_never_turns_down_has_no_peak():
    # β < 0: the gain keeps growing with d in both forms.
    for form in ("bon", "rl"):
        fit = fit_gao(form, KL_GRID, gao_curve(form, KL_GRID, 0.5, -0.1))
        assert fit.beta == pytest.approx(-0.1) and fit.peak_d is None and fit.peak_kl is None
    # A best-of-n curve that only falls peaks at d = 0.
    falling = fit_gao("bon", KL_GRID, gao_curve("bon", KL_GRID, -0.2, 0.1))
    assert falling.peak_d == 0.0


def test_a_peak_far_past_the_measured_kl_is_not_reported():
    # The demo's default PPO run: gold still rising at KL ~4 with a tiny fitted β put the RL
    # form's peak at exp(α/β − 1) ≈ 1e55 nats. Only peaks within reach of the data count.
    kl = [0.0, 1.0, 2.0, 3.0, 4.0]
    far = fit_gao("rl", kl, gao_curve("rl", kl, 0.34, 0.005))
    assert far.beta == pytest.approx(0.005) and far.peak_d is None and far.peak_kl is None
    near = fit_gao("rl", kl, gao_curve("rl", kl, 0.34, 0.4))  # peak at e^(−0.15)² ≈ 0.74
    assert near.peak_kl == pytest.approx(math.exp(2 * (0.34 / 0.4 - 1)))


def test_too_few_points_or_no_initial_score_give_no_fit():
    assert fit_gao("rl", [0.0, 4.0], [0.1, 0.3]) is None  # one point away from d = 0
    assert fit_gao("rl", [0.0, 0.0, 0.0], [0.1, 0.2, 0.3]) is None
    assert fit_gao("bon", [1.0, 4.0, 9.0], [0.1, 0.2, 0.25]) is None  # no KL 0, no R0 given
    assert fit_gao("bon", [1.0, 4.0, 9.0], [0.1, 0.2, 0.25], initial_score=0.0) is not None
    # NaN rows are dropped before counting.
    assert fit_gao("bon", [0.0, 1.0, float("nan")], [0.0, 0.2, 0.3]) is None
    # Negative Monte-Carlo KL estimates count as d = 0.
    assert fit_gao("rl", [-0.01, 1.0, 4.0], [0.0, 0.2, 0.3]).points == 2
    with pytest.raises(ValueError, match="one score per KL"):
        fit_gao("rl", [0.0, 1.0], [0.0])
    with pytest.raises(ValueError, match="Unknown overoptimisation fit form"):
        fit_gao("ppo", [0.0, 1.0], [0.0, 1.0])


def test_best_of_n_fit_reads_the_evaluation_and_needs_two_sizes():
    from rlhf_core.evaluation.comparison import BEST_OF_N_PREFIX, SFT, best_of_n_kl

    sizes = (2, 4, 16, 64)
    kl = [best_of_n_kl(n) for n in sizes]
    gold = gao_curve("bon", kl, 0.5, 0.1, initial=0.2)
    evaluation = {
        SFT: {"gold_score_mean": 0.2, "kl_to_sft": 0.0},
        "ppo": {"gold_score_mean": 0.9, "kl_to_sft": 7.0},  # not a best-of-n point
        "reward_model": {"eval_accuracy": 0.7},
        **{
            f"{BEST_OF_N_PREFIX}{n}": {"gold_score_mean": g, "kl_to_sft": k}
            for n, g, k in zip(sizes, gold, kl, strict=True)
        },
    }
    fit = best_of_n_fit(evaluation, best_of_n_prefix=BEST_OF_N_PREFIX, reference=SFT)
    assert fit.form == "bon" and fit.points == 4
    assert fit.alpha == pytest.approx(0.5) and fit.beta == pytest.approx(0.1)
    one_size = {k: v for k, v in evaluation.items() if k not in ("bon_4", "bon_16", "bon_64")}
    assert best_of_n_fit(one_size) is None
    no_gold = {k: {**v, "gold_score_mean": None} for k, v in evaluation.items()}
    assert best_of_n_fit(no_gold) is None
    assert best_of_n_fit(no_gold, score="rm_score_mean") is None  # no such metric here


# ---------------------------------------------------------------------------------------------
# The alarm
# ---------------------------------------------------------------------------------------------

STEPS = [0, 10, 20, 30, 40, 50, 60]


def test_window_change_is_the_fitted_change_across_the_window_whatever_the_spacing():
    assert window_change([0, 1, 2], [0.0, 0.1, 0.2]) == pytest.approx(0.2)
    assert window_change([0, 50, 100], [0.0, 0.1, 0.2]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="increasing steps"):
        window_change([5, 5], [0.0, 1.0])


def test_alarm_fires_when_the_proxy_rises_while_the_gold_falls():
    proxy = [0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8]
    gold = [0.0, 0.2, 0.3, 0.3, 0.2, 0.0, -0.2]  # peaks, then falls
    alarm = overoptimisation_alarm(STEPS, proxy, gold, window=3, epsilon=0.05)
    assert alarm.fired and alarm.status == "fired"
    # Windows ending at 20 and 30 see gold rising or flat; the one ending at 40 sees
    # 0.3, 0.3, 0.2 (fitted change -0.1) and fires.
    assert alarm.first_step == 40
    assert alarm.proxy_change == pytest.approx(0.6) and alarm.gold_change == pytest.approx(-0.1)
    assert overoptimisation_alarm(STEPS, proxy, gold, window=4, epsilon=0.05).first_step == 50


def test_alarm_stays_silent_when_both_rise_or_when_changes_are_within_epsilon():
    rising = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    both = overoptimisation_alarm(STEPS, rising, [g / 2 for g in rising], window=3, epsilon=0.05)
    assert not both.fired and both.status == "silent" and both.first_step is None
    assert both.proxy_change == pytest.approx(0.2)  # the last window's changes
    # Noise around flat curves, every window's change within ±epsilon.
    rng = random.Random(0)
    noisy_proxy = [0.5 + rng.uniform(-0.01, 0.01) for _ in STEPS]
    noisy_gold = [0.2 + rng.uniform(-0.01, 0.01) for _ in STEPS]
    assert not overoptimisation_alarm(STEPS, noisy_proxy, noisy_gold, 3, 0.05).fired
    # The same opposite trend, but smaller than epsilon: silent; above it: fires.
    small_proxy = [0.01 * i for i in range(7)]
    small_gold = [-0.01 * i for i in range(7)]
    assert not overoptimisation_alarm(STEPS, small_proxy, small_gold, 3, 0.05).fired
    assert overoptimisation_alarm(STEPS, small_proxy, small_gold, 3, 0.01).first_step == 20


def test_alarm_without_gold_or_with_too_few_evaluations_does_not_fire_and_says_why():
    off = overoptimisation_alarm(STEPS, [0.1] * 7, None)
    assert not off.fired and off.status == NO_GOLD
    assert NO_GOLD == "no judge (no gold judge, no held-out reward model): alarm off"
    short = overoptimisation_alarm([0, 10], [0.0, 1.0], [0.0, -1.0], window=3)
    assert not short.fired and short.status == "too few evaluations" and short.gold_change is None
    with pytest.raises(ValueError, match="window must be at least 2"):
        overoptimisation_alarm(STEPS, [0.0] * 7, [0.0] * 7, window=1)
    with pytest.raises(ValueError, match="one proxy and one gold score per step"):
        overoptimisation_alarm(STEPS, [0.0] * 7, [0.0] * 6)


def test_run_metrics_of_an_evaluation_history():
    kl = [0.0, 1.0, 4.0, 9.0, 16.0, 25.0, 36.0]
    gold = gao_curve("rl", kl, 0.6, 0.35, initial=0.1)
    history = [
        {"step": step, "score_mean": 0.2 * i, "kl_mean": kl[i], "gold_score_mean": gold[i]}
        for i, step in enumerate(STEPS)
    ]
    metrics = run_overoptimisation(history, window=3, epsilon=0.05)
    assert metrics["overoptimisation/alarm"] == 1 and metrics["overoptimisation/status"] == "fired"
    assert metrics["overoptimisation/gold_alpha"] == pytest.approx(0.6)
    assert metrics["overoptimisation/gold_beta"] == pytest.approx(0.35)
    assert metrics["overoptimisation/gold_peak_kl"] == pytest.approx(math.exp(0.6 / 0.35 - 1) ** 2)
    assert metrics["overoptimisation/proxy_r2"] is not None
    first = metrics["overoptimisation/first_step"]
    assert f"from step {first} the reward-model score rose" in overoptimisation_warning(metrics)
    without_gold = run_overoptimisation(
        [{k: v for k, v in row.items() if k != "gold_score_mean"} for row in history]
    )
    assert without_gold["overoptimisation/alarm"] is None
    assert without_gold["overoptimisation/status"] == NO_GOLD
    assert without_gold["overoptimisation/gold_alpha"] is None
    assert without_gold["overoptimisation/proxy_alpha"] is not None
    assert overoptimisation_warning(without_gold) is None
    assert (
        metrics["overoptimisation/judge"] == "gold"
        and without_gold["overoptimisation/judge"] is None
    )


def test_the_alarm_trusts_the_named_judge_and_the_warning_names_it():
    """Off the demo the held-out reward model stands in for the gold judge: the alarm reads
    its `judge_score_mean` and says whose score fell."""
    kl = [0.0, 1.0, 4.0, 9.0, 16.0, 25.0, 36.0]
    judge = gao_curve("rl", kl, 0.6, 0.35, initial=0.1)
    history = [
        {"step": step, "score_mean": 0.2 * i, "kl_mean": kl[i], "judge_score_mean": judge[i]}
        for i, step in enumerate(STEPS)
    ]
    metrics = run_overoptimisation(history, window=3, epsilon=0.05, judge="judge")
    assert metrics["overoptimisation/judge"] == "judge"
    assert metrics["overoptimisation/alarm"] == 1
    assert metrics["overoptimisation/gold_alpha"] == pytest.approx(0.6)
    assert "while the held-out reward model's score changed by" in overoptimisation_warning(metrics)
    # Trusting the gold judge, which did not score these evaluations: no judge, alarm off.
    assert run_overoptimisation(history, judge="gold")["overoptimisation/status"] == NO_GOLD
    assert run_overoptimisation(history, judge=None)["overoptimisation/alarm"] is None
    with pytest.raises(ValueError, match="Unknown judge 'oracle'; the judges are gold, judge"):
        run_overoptimisation(history, judge="oracle")


# ---------------------------------------------------------------------------------------------
# Real PPO runs: an over-optimised one fires, a KL-controlled one stays silent
# ---------------------------------------------------------------------------------------------


def favoured_share(ids: list[int], vocab_size: int) -> float:
    return sum(token < vocab_size // 2 for token in ids) / len(ids)


def repetition_loving_proxy(vocab_size: int):
    """A flawed reward model: likes tokens of the lower half of the vocabulary, and likes them
    more the more often one token repeats (as reward models learn to like "great great great").
    Its optimum, one favoured token over and over, is what the gold score penalises."""

    def score(rollout):
        return torch.tensor(
            [
                favoured_share(ids, vocab_size) * (1 + max(map(ids.count, ids)) / len(ids))
                for ids in rollout.response_ids
            ]
        )

    return score


def repetition_discounting_gold(vocab_size: int):
    """The true preference: the same favoured tokens, discounted by the share of distinct
    tokens (as the demo's gold judge discounts repeated words)."""

    def score(rollout):
        return torch.tensor(
            [
                favoured_share(ids, vocab_size) * len(set(ids)) / len(ids)
                for ids in rollout.response_ids
            ]
        )

    return score


def ppo_run(**overrides):
    tokenizer = word_tokenizer()
    rng = random.Random(1)
    prompts = [
        [{"role": "user", "content": " ".join(rng.choice(FILM_WORDS) for _ in range(1 + i % 4))}]
        for i in range(16)
    ]
    settings = PPOTrainSettings(
        **{
            **TINY_PPO_TRAIN,
            "iterations": 20,
            "eval_every": 2,
            "checkpoint_every": 0,
            "rollout_batch_size": 16,
            "minibatch_size": 16,
            "ppo_epochs": 2,
            "learning_rate": 3e-2,
            "missing_eos_penalty": 0.0,
            **overrides,
        }
    )
    policy = PolicyWithValueHead(build_tiny_llama("nano", tokenizer, seed=0), seed=0)
    reference = build_tiny_llama("nano", tokenizer, seed=0)
    proxy = repetition_loving_proxy(len(tokenizer))
    result = train_ppo(
        PPOModels(policy, reference, proxy, tokenizer),
        prompts,
        settings,
        seed=0,
        eval_prompts=prompts,
        judges={"gold": repetition_discounting_gold(len(tokenizer))},
        show_progress=False,
    )
    return result.eval_history, run_overoptimisation(result.eval_history)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_alarm_fires_on_an_over_optimised_ppo_run_and_not_on_a_kl_controlled_one():
    # No KL penalty: the policy collapses onto one favoured token; the proxy keeps rising
    # while the gold score, after rising with it, falls.
    history, metrics = ppo_run(init_kl_coef=0.0, adaptive_kl=False)
    proxy = [row["score_mean"] for row in history]
    gold = [row["gold_score_mean"] for row in history]
    peak = int(np.argmax(gold))
    assert 0 < peak < len(gold) - 1 and gold[-1] < gold[peak] - 0.2, gold
    assert proxy[-1] > proxy[peak] + 0.3, proxy
    assert metrics["overoptimisation/alarm"] == 1, metrics
    assert history[peak]["step"] < metrics["overoptimisation/first_step"], metrics
    # The default KL control (adaptive β from 0.2, target 3 nats): the same reward model
    # and learning rate, and the gold score rises with the proxy.
    history, metrics = ppo_run()
    gold = [row["gold_score_mean"] for row in history]
    assert gold[-1] > gold[0], gold
    assert max(row["kl_mean"] for row in history) < 5.0
    assert metrics["overoptimisation/alarm"] == 0, metrics
    assert metrics["overoptimisation/status"] == "silent"


# ---------------------------------------------------------------------------------------------
# The run summary
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alarm", "status", "expected"),
    [
        (1, "fired", "warning: ppo: overoptimisation alarm: from step 14 the reward-model score"),
        (
            None,
            NO_GOLD,
            "ppo: no judge (no gold judge, no held-out reward model): alarm off; "
            "set reward.judge.enabled: true",
        ),
        (0, "silent", None),
    ],
)
def test_the_run_summary_warns_when_the_alarm_fired(tmp_path, capsys, alarm, status, expected):
    import json

    from rlhf_core.app.summary import print_summary
    from rlhf_core.paths import ProjectPaths

    ppo_file = ProjectPaths(tmp_path).metrics_file("ppo")
    ppo_file.parent.mkdir(parents=True)
    ppo_metrics = {
        "overoptimisation/alarm": alarm,
        "overoptimisation/status": status,
        "overoptimisation/first_step": 14 if alarm else None,
        "overoptimisation/window": 3,
        "overoptimisation/proxy_change": 0.302,
        "overoptimisation/gold_change": -0.207,
    }
    ppo_file.write_text(json.dumps(ppo_metrics), encoding="utf-8")
    print_summary({}, tmp_path)
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    if expected is None:
        assert "overoptimisation" not in printed and "alarm" not in printed
    else:
        assert expected in printed
    if alarm == 1:
        changed = "rose by +0.302 while the gold judge's score changed by -0.207 over 3 evaluations"
        assert changed in printed
