"""The held-out judge: a reward model trained on prompts the proxy never saw, the
overoptimisation alarm's stand-in for a gold judge where the data have none (issue: "an
independent held-out reward model trained on a disjoint split")."""

import json

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from tiny_models import TINY_PPO_TRAIN

from rlhf_core.config import DataSettings
from rlhf_core.config.reward import JudgeSettings, RewardSettings
from rlhf_core.config.stages import PPOSettings
from rlhf_core.config.training import PPOTrainSettings, TrainSettings
from rlhf_core.data.splits import judge_split
from rlhf_core.models.heads import RewardModel
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.paths import ProjectPaths
from rlhf_core.scoring import judge_dir, load_judge, reward_member_dirs
from rlhf_core.stages.common import StageContext, load_split
from rlhf_core.stages.ppo import run_ppo, trusted_judge
from rlhf_core.stages.reward import run_reward
from rlhf_core.tracking.lineage import read_producer_run_id

pytestmark = pytest.mark.usefixtures("one_thread")


def _frame(prompts: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {"prompt": prompts, "chosen": ["good"] * len(prompts), "rejected": ["bad"] * len(prompts)}
    )


def test_the_judges_split_shares_no_prompt_and_no_prompt_moves_as_data_grow():
    prompts = [f"Write a review of Film {i}." for i in range(400)]
    frame = _frame(prompts + prompts[:100])  # 100 prompts with two pairs each
    proxy, judge = judge_split(frame, 0.3)
    assert len(proxy) + len(judge) == len(frame)
    assert not set(proxy["prompt"]) & set(judge["prompt"])
    assert 0.22 < judge["prompt"].nunique() / 400 < 0.38
    grown_proxy, grown_judge = judge_split(_frame(prompts + [f"New {i}" for i in range(50)]), 0.3)
    assert set(judge["prompt"]) <= set(grown_judge["prompt"])
    assert set(proxy["prompt"]) <= set(grown_proxy["prompt"])
    # Independent of the train/eval split's positions: another salt, another split.
    assert set(judge_split(frame, 0.3, salt="x")[1]["prompt"]) != set(judge["prompt"])
    for share in (0.0, 1.0, True):
        with pytest.raises(ValueError, match="the judge's share must be a number in"):
            judge_split(frame, share)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: JudgeSettings(share=0), "reward.judge.share must be a number strictly between"),
        (lambda: JudgeSettings(share=1.5), "reward.judge.share must be a number strictly between"),
        (lambda: JudgeSettings(enabled="yes"), "reward.judge.enabled must be true or false"),
        (lambda: RewardSettings(judge=[True]), "reward.judge must be a mapping"),
        (lambda: PPOSettings(overoptimisation_judge="oracle"), "overoptimisation_judge must be"),
    ],
)
def test_bad_judge_settings_are_one_error_line(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_the_reward_stage_trains_the_judge_on_the_prompts_the_reward_model_did_not_see(
    tiny_project, tiny_params, mlflow_uri, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    settings = RewardSettings(
        train=TrainSettings(
            learning_rate=3e-3, warmup_steps=1, max_steps=4, batch_size=8, eval_every=2
        ),
        use_rankings=False,
        judge={"enabled": True, "share": 0.5},
    )
    data = DataSettings(eval_fraction=tiny_params.data.eval_fraction)
    metrics = run_reward(settings, StageContext(data, 0, tiny_project, show_progress=False))

    paths = ProjectPaths(tiny_project)
    train_pairs, _ = load_split(paths, "preference", data)
    proxy_rows, judge_rows = judge_split(train_pairs, 0.5)
    assert metrics["train_pairs"] == len(proxy_rows) and len(proxy_rows) > 0
    assert metrics["judge/train_pairs"] == len(judge_rows) > 0
    # Held out on the same pairs as the reward model, trained from its own seed.
    assert 0.0 <= metrics["judge/eval_accuracy"] <= 1.0 and "eval_accuracy" in metrics
    judge = load_judge(paths.reward_model_dir)
    assert isinstance(judge, RewardModel) and not judge.training
    proxy_weights = load_file(str(paths.reward_model_dir / "model.safetensors"))
    judge_weights = load_file(str(judge_dir(paths.reward_model_dir) / "model.safetensors"))
    assert proxy_weights.keys() == judge_weights.keys()
    assert any(not torch.equal(proxy_weights[k], judge_weights[k]) for k in proxy_weights)
    # Not an ensemble member: whatever loads the reward model's members loads one.
    assert reward_member_dirs(paths.reward_model_dir) == [paths.reward_model_dir]
    assert not paths.checkpoints_dir("reward").exists()  # its work folder went with the stage's
    saved = json.loads(paths.metrics_file("reward").read_text())
    assert saved["judge/train_pairs"] == len(judge_rows)

    run_id = read_producer_run_id(paths.reward_model_dir)
    client = MlflowClient(mlflow_uri)
    curve = client.get_metric_history(run_id, "judge/loss")
    assert [m.step for m in curve] == [1, 2, 3, 4]
    inputs = {d.dataset.name.split("@")[0] for d in client.get_run(run_id).inputs.dataset_inputs}
    assert {"preference_train", "preference_judge", "preference_eval"} <= inputs


def test_a_share_that_leaves_one_side_empty_is_one_error_line(tiny_project, tiny_params):
    settings = RewardSettings(judge={"enabled": True, "share": 0.001})
    data = DataSettings(eval_fraction=tiny_params.data.eval_fraction)
    with pytest.raises(ValueError, match=r"reward.judge.share 0.001 of \d+ training pairs leaves"):
        run_reward(settings, StageContext(data, 0, tiny_project, show_progress=False))


def _save_judge(project) -> None:
    paths = ProjectPaths(project)
    causal_lm, _ = load_causal_lm(str(paths.sft_model_dir))
    RewardModel.from_causal_lm(causal_lm, seed=7).save_pretrained(judge_dir(paths.reward_model_dir))


def test_the_alarm_uses_gold_on_the_demo_else_the_judge_and_names_what_is_missing(tiny_project):
    paths = ProjectPaths(tiny_project)
    demo, files = DataSettings(source="demo"), DataSettings(source="files")
    assert trusted_judge("auto", demo, paths) == "gold"
    assert trusted_judge("auto", files, paths) is None
    with pytest.raises(ValueError, match="trained no held-out judge"):
        trusted_judge("judge", demo, paths)
    with pytest.raises(ValueError, match="only the demo's data have a gold judge"):
        trusted_judge("gold", files, paths)
    _save_judge(tiny_project)
    assert trusted_judge("auto", files, paths) == "judge"
    assert trusted_judge("auto", demo, paths) == "gold"
    assert trusted_judge("judge", demo, paths) == "judge"


@pytest.mark.slow  # a PPO stage run
def test_off_the_demo_ppo_scores_its_evaluations_with_the_judge_and_its_alarm_reads_them(
    tiny_project, tiny_params
):
    _save_judge(tiny_project)
    data = tiny_params.data.model_copy(update={"source": "files"})  # user data: no gold judge
    uri = f"sqlite:///{tiny_project / 'mlflow.db'}"
    train = dict(TINY_PPO_TRAIN, iterations=3, eval_every=1, checkpoint_every=0)
    settings = PPOSettings(train=PPOTrainSettings(**train), max_eval_prompts=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        metrics = run_ppo(settings, StageContext(data, 0, tiny_project, show_progress=False))
    assert "eval/gold_score_mean" not in metrics
    assert isinstance(metrics["eval/judge_score_mean"], float)
    assert metrics["overoptimisation/judge"] == "judge"
    assert metrics["overoptimisation/status"] in ("fired", "silent")
    assert metrics["overoptimisation/alarm"] in (0, 1)
    assert isinstance(metrics["overoptimisation/gold_change"], float)  # the judge's curve
    run = MlflowClient(uri).get_run(
        read_producer_run_id(ProjectPaths(tiny_project).policy_dir("ppo"))
    )
    assert run.data.tags["overoptimisation.judge"] == "the held-out reward model"
    judged = MlflowClient(uri).get_metric_history(run.info.run_id, "eval/judge_score_mean")
    assert [m.step for m in judged] == [0, 1, 2, 3]
