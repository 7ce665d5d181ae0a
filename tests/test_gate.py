"""The quality gate (pure decisions) and the head-to-head win rate it uses against a champion."""

import math

import pytest

from rlhf_core.config.gate import GateSettings
from rlhf_core.data.gold import GoldJudge
from rlhf_core.evaluation.head_to_head import head_to_head_win_rate
from rlhf_core.gate import decide, select_candidate
from rlhf_core.generation import SamplingSettings
from rlhf_core.models.loading import load_tokenizer, save_model
from rlhf_core.models.tiny import build_tiny_llama
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import load_validated


def evaluation(dpo=None, ppo=None, reward_accuracy=0.7):
    """An evaluate.json-shaped dict; a policy given as None is left out."""
    result = {"reward_model": {"eval_accuracy": reward_accuracy, "eval_margin_mean": 0.4}}
    for name, metrics in (("dpo", dpo), ("ppo", ppo)):
        if metrics is not None:
            result[name] = metrics
    return result


def policy(gold, kl=3.0, rm=None, ended=1.0):
    return {
        "gold_win_rate_vs_sft": gold,
        "rm_win_rate_vs_sft": rm,
        "kl_to_sft": kl,
        "ended_fraction": ended,
    }


SETTINGS = GateSettings()


# --------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------


def test_first_champion_needs_only_the_absolute_thresholds():
    decision = decide(evaluation(dpo=policy(0.71)), SETTINGS, None, has_champion=False)
    assert decision.promote and decision.candidate == "dpo"
    assert "dpo: gold_win_rate_vs_sft 0.71 ≥ 0.60" in decision.reasons
    assert decision.checks["dpo.gold_win_rate_vs_sft"] == {
        "value": 0.71,
        "threshold": 0.6,
        "comparison": ">=",
        "passed": True,
    }
    assert decision.checks["dpo.kl_to_sft"]["passed"]
    assert decision.checks["reward_model.eval_accuracy"]["passed"]
    assert not any("champion" in name for name in decision.checks)


def test_a_policy_that_stopped_ending_its_answers_is_no_candidate():
    """A policy that learned never to stop (to please a reward model that scores unfinished
    text high) fails the gate whatever its win rate; another one that ends is chosen."""
    rambling = evaluation(dpo=policy(0.95, ended=0.3))
    decision = decide(rambling, SETTINGS, None, has_champion=False)
    assert not decision.promote and decision.candidate is None
    assert "dpo: ended_fraction 0.30 < 0.90" in decision.reasons
    both = evaluation(dpo=policy(0.95, ended=0.3), ppo=policy(0.7, ended=0.95))
    assert decide(both, SETTINGS, None, has_champion=False).candidate == "ppo"


def test_a_policy_that_forgot_general_answers_is_no_candidate_when_asked():
    """With min_sanity_pass_fraction, the sanity prompts' pass share is one more check; a
    policy evaluated without sanity prompts fails it; without the setting nothing changes."""
    forgetful = {**policy(0.9), "sanity_pass_fraction": 1 / 3}
    keeps = {**policy(0.7), "sanity_pass_fraction": 1.0}
    strict = GateSettings(min_sanity_pass_fraction=0.66)
    decision = decide(evaluation(dpo=forgetful, ppo=keeps), strict, None, has_champion=False)
    assert decision.candidate == "ppo"
    assert "dpo: sanity_pass_fraction 0.33 < 0.66" in decision.reasons
    unasked = decide(evaluation(dpo=policy(0.9)), strict, None, has_champion=False)
    assert not unasked.promote and not unasked.checks["dpo.sanity_pass_fraction"]["passed"]
    lenient = decide(evaluation(dpo=forgetful), SETTINGS, None, has_champion=False)
    assert lenient.candidate == "dpo" and "dpo.sanity_pass_fraction" not in lenient.checks


def test_with_a_champion_the_head_to_head_win_rate_decides():
    metrics = evaluation(dpo=policy(0.71))
    unmeasured = decide(metrics, SETTINGS, None, has_champion=True)
    loses = decide(metrics, SETTINGS, 0.5, has_champion=True)
    wins = decide(metrics, SETTINGS, 0.6, has_champion=True)
    assert not unmeasured.promote and unmeasured.candidate == "dpo"
    assert any("no head-to-head win rate" in reason for reason in unmeasured.reasons)
    assert not loses.promote
    assert loses.checks["dpo.win_rate_vs_champion"] == {
        "value": 0.5,
        "threshold": SETTINGS.min_win_rate_vs_champion,
        "comparison": ">=",
        "passed": False,
    }
    assert "dpo: win_rate_vs_champion 0.50 < 0.55" in loses.reasons
    assert wins.promote and wins.checks["dpo.win_rate_vs_champion"]["passed"]


def test_a_null_gold_metric_falls_back_to_the_reward_model_metric_and_says_so():
    metrics = evaluation(dpo=policy(None, rm=0.65), ppo=policy(None, rm=0.8))
    decision = decide(metrics, SETTINGS, None, has_champion=False)
    assert decision.promote and decision.candidate == "ppo"
    check = decision.checks["ppo.rm_win_rate_vs_sft"]
    assert check["value"] == 0.8 and check["passed"]
    assert check["fallback_from"] == "gold_win_rate_vs_sft"
    assert "ppo.gold_win_rate_vs_sft" not in decision.checks
    assert any("ppo" in r and "rm_win_rate_vs_sft" in r and "null" in r for r in decision.reasons)


def test_the_candidate_is_the_best_policy_that_passes_every_absolute_threshold():
    far_from_sft = evaluation(dpo=policy(0.9, kl=40.0), ppo=policy(0.65))
    assert select_candidate(far_from_sft, SETTINGS).candidate == "ppo"
    both_pass = evaluation(dpo=policy(0.7), ppo=policy(0.8))
    assert select_candidate(both_pass, SETTINGS).candidate == "ppo"
    tied = evaluation(dpo=policy(0.7), ppo=policy(0.7))
    assert select_candidate(tied, SETTINGS).candidate == "dpo"  # listed first
    only_ppo = GateSettings(candidate_policies=("ppo",))
    assert select_candidate(both_pass, only_ppo).candidate == "ppo"
    assert (
        select_candidate(evaluation(ppo=policy(0.7)), SETTINGS)
        .reasons[0]
        .startswith("dpo: not in the evaluation")
    )


def test_when_every_policy_fails_nothing_is_promoted_and_each_failure_has_a_reason():
    metrics = evaluation(dpo=policy(0.4), ppo=policy(0.9, kl=31.2))
    decision = decide(metrics, SETTINGS, 0.9, has_champion=True)
    assert not decision.promote and decision.candidate is None
    assert "dpo: gold_win_rate_vs_sft 0.40 < 0.60" in decision.reasons
    assert "ppo: kl_to_sft 31.20 > 25.00" in decision.reasons
    assert not decision.checks["dpo.gold_win_rate_vs_sft"]["passed"]
    assert not decision.checks["ppo.kl_to_sft"]["passed"]
    assert decision.checks["ppo.gold_win_rate_vs_sft"]["passed"]


def test_an_inaccurate_reward_model_blocks_promotion():
    metrics = evaluation(dpo=policy(0.8), reward_accuracy=0.55)
    decision = decide(metrics, SETTINGS, None, has_champion=False)
    assert not decision.promote and decision.candidate == "dpo"
    assert "reward_model: eval_accuracy 0.55 < 0.60" in decision.reasons


@pytest.mark.parametrize("missing", [None, math.nan, "0.9"])
def test_a_missing_or_invalid_metric_fails_its_check(missing):
    metrics = evaluation(dpo=policy(missing, rm=None))
    decision = decide(metrics, SETTINGS, None, has_champion=False)
    assert not decision.promote and decision.candidate is None
    assert decision.checks["dpo.gold_win_rate_vs_sft"]["value"] is None
    assert "dpo: gold_win_rate_vs_sft is missing, so the check fails" in decision.reasons


def test_settings_reject_impossible_thresholds():
    with pytest.raises(ValueError, match="max_kl"):
        GateSettings(max_kl=-1.0)
    with pytest.raises(ValueError, match="min_win_rate_vs_champion"):
        GateSettings(min_win_rate_vs_champion=1.5)
    with pytest.raises(ValueError, match="candidate_policies"):
        GateSettings(candidate_policies=())
    with pytest.raises(ValueError, match="min_sanity_pass_fraction"):
        GateSettings(min_sanity_pass_fraction=2.0)
    with pytest.raises(ValueError, match="block_on_overoptimisation"):
        GateSettings(block_on_overoptimisation="yes")


def ppo_stage(alarm, first_step=None):
    """ppo.json's overoptimisation keys (alarm None: no gold judge, the alarm is off)."""
    return {
        "ppo": {
            "overoptimisation/alarm": alarm,
            "overoptimisation/first_step": first_step,
            "eval/score_mean": 1.2,
        },
        "dpo": {"eval/loss": 0.5},  # DPO's stage metrics have no alarm
    }


BLOCKING = GateSettings(block_on_overoptimisation=True)


def test_a_fired_overoptimisation_alarm_blocks_the_policy_only_when_the_knob_is_on():
    both = evaluation(dpo=policy(0.65), ppo=policy(0.8))
    # Off (the default): the alarm only warns, and PPO, with the better metric, is promoted.
    warned = decide(both, SETTINGS, None, has_champion=False, stage_metrics=ppo_stage(1, 14))
    assert warned.candidate == "ppo" and warned.promote
    assert "ppo.overoptimisation/alarm" not in warned.checks
    # On: PPO fails its alarm check and DPO, which has no alarm, becomes the candidate.
    blocked = decide(both, BLOCKING, None, has_champion=False, stage_metrics=ppo_stage(1, 14))
    assert blocked.candidate == "dpo" and blocked.promote
    assert blocked.checks["ppo.overoptimisation/alarm"] == {
        "value": 1.0,
        "threshold": 0.0,
        "comparison": "<=",
        "passed": False,
    }
    assert "dpo.overoptimisation/alarm" not in blocked.checks
    assert (
        "ppo: the overoptimisation alarm fired at step 14 (the reward-model score rose while the "
        "gold score fell), and gate.block_on_overoptimisation is on"
    ) in blocked.reasons
    # On, alarm silent: PPO passes the check and wins again.
    silent = decide(both, BLOCKING, None, has_champion=False, stage_metrics=ppo_stage(0))
    assert silent.candidate == "ppo" and silent.checks["ppo.overoptimisation/alarm"]["passed"]


def test_with_no_gold_judge_the_alarm_is_off_and_cannot_block():
    only_ppo = GateSettings(block_on_overoptimisation=True, candidate_policies=("ppo",))
    decision = decide(
        evaluation(ppo=policy(None, rm=0.8)),
        only_ppo,
        None,
        has_champion=False,
        stage_metrics=ppo_stage(None),
    )
    assert decision.promote and decision.candidate == "ppo"
    assert "ppo.overoptimisation/alarm" not in decision.checks
    assert (
        "ppo: no gold judge, so the overoptimisation alarm is off and does not block"
        in decision.reasons
    )
    # Without PPO's stage metrics at all there is nothing to read, and nothing blocks.
    assert decide(evaluation(ppo=policy(0.8)), only_ppo, None, has_champion=False).promote


def test_the_gate_task_reads_each_policy_stage_metrics_that_exist(tmp_path):
    import json
    from pathlib import Path

    from rlhf_core.scripts import load_script

    quality_gate = load_script(Path(__file__).resolve().parents[1] / "tasks" / "quality_gate.py")
    metrics_dir = tmp_path / "artifacts" / "metrics"
    metrics_dir.mkdir(parents=True)
    (metrics_dir / "ppo.json").write_text(json.dumps(ppo_stage(1, 6)["ppo"]), encoding="utf-8")
    read = quality_gate.stage_metrics(tmp_path, ("dpo", "ppo"))
    assert read == {"ppo": ppo_stage(1, 6)["ppo"]}  # no dpo.json, no entry
    blocked = decide(
        evaluation(ppo=policy(0.8)), BLOCKING, None, has_champion=False, stage_metrics=read
    )
    assert not blocked.promote and blocked.candidate is None


def test_decision_serialises_to_plain_json_types():
    import json

    decision = decide(evaluation(dpo=policy(0.71)), SETTINGS, 0.6, has_champion=True)
    again = json.loads(json.dumps(decision.as_dict()))
    assert again["promote"] is True and again["candidate"] == "dpo"
    assert again["checks"] == decision.checks


# --------------------------------------------------------------------------------------------
# Head to head
# --------------------------------------------------------------------------------------------

SAMPLING = SamplingSettings(max_new_tokens=6, batch_size=8)


def held_out_prompts(root, count=4):
    return list(load_validated(ProjectPaths(root), "eval_prompts")["prompt"][:count])


def test_a_model_against_itself_with_the_same_seed_wins_half(tiny_project):
    sft_dir = ProjectPaths(tiny_project).sft_model_dir
    prompts = held_out_prompts(tiny_project)
    result = head_to_head_win_rate(sft_dir, sft_dir, prompts, SAMPLING, seed=3, judge=GoldJudge())
    assert result == {"win_rate": 0.5, "ci_low": 0.5, "ci_high": 0.5, "judge": "gold", "n": 4}


def test_swapping_candidate_and_champion_gives_the_complementary_win_rate(tiny_project, tmp_path):
    paths = ProjectPaths(tiny_project)
    tokenizer = load_tokenizer(str(paths.sft_model_dir))
    other_dir = save_model(build_tiny_llama("nano", tokenizer, seed=7), tokenizer, tmp_path / "o")
    prompts = held_out_prompts(tiny_project)
    reward_dir = paths.reward_model_dir
    forward = head_to_head_win_rate(
        paths.sft_model_dir, other_dir, prompts, SAMPLING, seed=1, reward_model_dir=reward_dir
    )
    backward = head_to_head_win_rate(
        other_dir, paths.sft_model_dir, prompts, SAMPLING, seed=1, reward_model_dir=reward_dir
    )
    assert forward["judge"] == backward["judge"] == "reward_model"
    assert forward["n"] == backward["n"] == len(prompts)
    assert forward["win_rate"] + backward["win_rate"] == pytest.approx(1.0)
    assert forward["ci_low"] <= forward["win_rate"] <= forward["ci_high"]


def test_head_to_head_needs_prompts_and_a_judge(tiny_project):
    sft_dir = ProjectPaths(tiny_project).sft_model_dir
    with pytest.raises(ValueError, match="judge"):
        head_to_head_win_rate(sft_dir, sft_dir, held_out_prompts(tiny_project), SAMPLING)
    with pytest.raises(ValueError, match="prompt"):
        head_to_head_win_rate(sft_dir, sft_dir, [], SAMPLING, judge=GoldJudge())


# --------------------------------------------------------------------------------------------
# People's votes (`rlhf label`)
# --------------------------------------------------------------------------------------------

HUMAN = GateSettings(min_human_win_rate=0.6, min_human_votes=10)


def test_peoples_win_rate_decides_only_once_enough_votes_exist():
    metrics = evaluation(dpo=policy(0.71))
    few = decide(metrics, HUMAN, 0.7, has_champion=True, human={"counted": 9, "win_rate": 0.1})
    assert few.promote  # 9 votes < 10: decided without them, and said so
    assert "dpo.human_win_rate_vs_champion" not in few.checks
    assert any("9 people's vote(s)" in reason and "(10)" in reason for reason in few.reasons)
    losing = decide(metrics, HUMAN, 0.7, has_champion=True, human={"counted": 10, "win_rate": 0.55})
    assert not losing.promote
    assert losing.checks["dpo.human_win_rate_vs_champion"]["passed"] is False
    assert "dpo: human_win_rate_vs_champion 0.55 < 0.60" in losing.reasons
    winning = decide(metrics, HUMAN, 0.7, has_champion=True, human={"counted": 12, "win_rate": 0.6})
    assert winning.promote and winning.checks["dpo.human_win_rate_vs_champion"]["passed"]
    # Off by default: votes change nothing.
    outvoted = {"counted": 50, "win_rate": 0.0}
    default = decide(metrics, SETTINGS, 0.7, has_champion=True, human=outvoted)
    assert default.promote and not any("human" in name for name in default.checks)


def test_human_gate_settings_are_checked():
    with pytest.raises(ValueError, match="min_human_win_rate"):
        GateSettings(min_human_win_rate=1.5)
    with pytest.raises(ValueError, match="min_human_votes"):
        GateSettings(min_human_win_rate=0.6, min_human_votes=0)


def test_the_gate_task_counts_the_votes_on_exactly_its_candidate_and_champion(tmp_path):
    """Votes from a real votes log, matched to the candidate by the run that trained its
    files (the output's run marker) and to the champion by its version's run."""
    from pathlib import Path
    from types import SimpleNamespace

    from rlhf_core.data.votes import VoteJournal
    from rlhf_core.evaluation.human_votes import win_rates_line
    from rlhf_core.scripts import load_script
    from rlhf_core.tracking.lineage import write_run_marker

    quality_gate = load_script(Path(__file__).resolve().parents[1] / "tasks" / "quality_gate.py")
    paths = ProjectPaths(tmp_path)
    policy_dir = paths.policy_dir("dpo")
    policy_dir.mkdir(parents=True)
    (policy_dir / "config.json").write_text("{}")
    write_run_marker(policy_dir, {"run_id": "run-new"})
    champion = SimpleNamespace(run_id="run-champ", version="3")
    assert quality_gate.human_votes(tmp_path, "dpo", champion) is None  # nobody voted yet

    journal = VoteJournal(paths.labels_dir, paths.incoming_dir, batch_size=100)
    sides = {"new": "run-new", "champ": "run-champ", "older": "run-older"}

    def vote(a, b, verdict, annotator, comparison):
        journal.append(
            {
                "comparison_id": comparison,
                "verdict": verdict,
                "annotator": annotator,
                "model_a": "candidate" if a != "champ" else "champion",
                "model_b": "candidate" if b != "champ" else "champion",
                "model_a_run_id": sides[a],
                "model_b_run_id": sides[b],
                "rows": [],
            }
        )

    vote("new", "champ", "a", "ann-1", "c1")  # candidate wins
    vote("new", "champ", "a", "ann-2", "c1")  # agrees with ann-1
    vote("champ", "new", "b", "ann-1", "c2")  # candidate wins from the right side
    vote("champ", "new", "a", "ann-1", "c3")  # champion wins
    vote("new", "champ", "tie", "ann-1", "c4")
    vote("new", "champ", "both_bad", "ann-1", "c5")  # left out of the win rate
    vote("older", "champ", "b", "ann-1", "c6")  # an older candidate: not this one
    human = quality_gate.human_votes(tmp_path, "dpo", champion)
    assert (human["wins"], human["losses"], human["ties"], human["both_bad"]) == (3, 1, 1, 1)
    assert human["counted"] == 5 and human["votes_total"] == 7
    assert human["win_rate"] == pytest.approx(3.5 / 5)
    assert human["low"] < 0.7 < human["high"]
    assert human["agreement"] == 1.0 and human["agreement_pairs"] == 1
    line = win_rates_line("dpo", policy(0.71, rm=0.64), human)
    assert line.startswith("dpo: gold win rate vs SFT 0.71, RM 0.64; people vs the champion 0.70")
    assert "5 votes" in line
    assert win_rates_line("dpo", {}, None).endswith("n/a (no votes on this candidate)")
    decision = decide(
        evaluation(dpo=policy(0.71)),
        GateSettings(min_human_win_rate=0.75, min_human_votes=5),
        0.7,
        has_champion=True,
        human=human,
    )
    assert not decision.promote
    assert "dpo: human_win_rate_vs_champion 0.70 < 0.75" in decision.reasons
