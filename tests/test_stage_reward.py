"""The reward stage and its task: pairs and rankings in one forward pass, one likelihood."""

import copy
import json

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from tiny_models import model_and_split
from training_checks import assert_same_step, train_one_step

import rlhf_core.training.objectives.reward as reward_task_module
from rlhf_core.algorithms.preference import bradley_terry_loss, plackett_luce_loss
from rlhf_core.config import DataSettings
from rlhf_core.config.reward import RewardSettings
from rlhf_core.config.training import TrainSettings
from rlhf_core.models.heads import RewardModel
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.paths import ProjectPaths
from rlhf_core.scoring import score_token_ids
from rlhf_core.stages.common import StageContext, load_validated, train_eval_split
from rlhf_core.stages.reward import pair_groups, ranking_groups, run_reward
from rlhf_core.tracking.lineage import read_producer_run_id
from rlhf_core.training.loop import train
from rlhf_core.training.objectives.reward import (
    ComparisonGroup,
    RewardObjective,
    collate_groups,
    group_losses,
    tokenize_group,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sft_and_groups(tiny_project, tiny_params):
    """The tiny SFT model, its tokenizer, train pair groups and train ranking groups."""
    model, tokenizer, pairs, _ = model_and_split(tiny_project, "sft", "preference", 0.2)
    rankings, _ = train_eval_split(load_validated(ProjectPaths(tiny_project), "ranked"), 0.2)
    return (
        model,
        tokenizer,
        pair_groups(tokenizer, pairs, 256, use_margin=False),
        ranking_groups(tokenizer, rankings, 256),
    )


def _reward_model(causal_lm, seed=0):
    return RewardModel.from_causal_lm(copy.deepcopy(causal_lm), seed=seed)


def _settings(**overrides):
    base = dict(learning_rate=1e-2, warmup_steps=0, batch_size=8, max_steps=1, seed=0)
    return TrainSettings(**{**base, **overrides})


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


def test_bucketed_forwards_score_every_sequence_once_and_units_count_choices(sft_and_groups):
    model, tokenizer, pairs, rankings = sft_and_groups
    groups = [pairs[0], rankings[0], pairs[1]]
    task = RewardObjective(groups, [], tokenizer.pad_token_id)
    batch = task.collate([0, 1, 2])
    k = len(rankings[0].sequences)
    assert batch["input_ids"].shape[0] == 4 + k
    assert batch["pair_index"].tolist() == [[0, 1], [2 + k, 3 + k]]
    assert batch["ranking_index"][0].tolist() == list(range(2, 2 + k))
    assert task.units(batch) == 2 + (k - 1)

    reward_model = _reward_model(model)
    rows = []
    handle = reward_model.backbone.register_forward_pre_hook(
        lambda _m, _a, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    loss, metrics = task.loss(reward_model, batch)
    handle.remove()
    # chosen, rejected and ranked responses together: each sequence once, in one forward pass
    # per length bucket (`training.buckets`), never one pass per group
    assert sum(rows) == 4 + k and len(rows) <= (4 + k) // 2

    with torch.no_grad():  # each sequence scored alone, without padding
        alone = torch.stack(
            [
                reward_model(torch.tensor([s.input_ids]), torch.ones(1, len(s)))[0]
                for group in groups
                for s in group.sequences
            ]
        )
    pair_rows = batch["pair_index"]
    expected = bradley_terry_loss(alone[pair_rows[:, 0]], alone[pair_rows[:, 1]]).sum()
    expected = expected + plackett_luce_loss(alone[2 : 2 + k].unsqueeze(0)).sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    gaps = [alone[0] - alone[1], alone[2 + k] - alone[3 + k]]
    gaps += [alone[2 + i] - alone[3 + i] for i in range(k - 1)]
    assert metrics["accuracy"] == sum(float(g > 0) for g in gaps)
    assert metrics["margin"] == pytest.approx(float(sum(gaps)), rel=1e-4)


def test_margin_enters_bradley_terry_only_when_enabled():
    rewards = torch.tensor([2.0, 1.0, 0.5, 0.0])
    groups = [
        ComparisonGroup((_seq(1), _seq(2)), margin=0.7),
        ComparisonGroup((_seq(3), _seq(4)), margin=-0.2),
    ]
    batch = collate_groups(groups, pad_id=0)
    with_margin, _ = group_losses(rewards, batch, use_margin=True)
    without, _ = group_losses(rewards, batch, use_margin=False)
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0])
    margin = torch.tensor([0.7, -0.2])
    assert float(with_margin) == pytest.approx(
        float(bradley_terry_loss(chosen, rejected, margin).sum())
    )
    assert float(without) == pytest.approx(float(bradley_terry_loss(chosen, rejected).sum()))


def test_rankings_use_plackett_luce_with_padding_ignored():
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.5, -1.0])
    groups = [
        ComparisonGroup((_seq(1), _seq(2), _seq(3)), is_ranking=True),
        ComparisonGroup((_seq(4), _seq(5)), is_ranking=True),
    ]
    batch = collate_groups(groups, pad_id=0)
    assert batch["ranking_lengths"].tolist() == [3, 2]
    loss, metrics = group_losses(rewards, batch, use_margin=False)
    expected = plackett_luce_loss(torch.tensor([[3.0, 1.0, 2.0]])) + plackett_luce_loss(
        torch.tensor([[0.5, -1.0]])
    )
    assert float(loss) == pytest.approx(float(expected.sum()))
    assert float(metrics["accuracy"]) == 2  # 3 > 1 yes, 1 > 2 no, 0.5 > -1 yes
    assert float(metrics["margin"]) == pytest.approx((3 - 1) + (1 - 2) + (0.5 + 1))


def _seq(token):
    from rlhf_core.training.tokenize import TokenizedCompletion

    return TokenizedCompletion(input_ids=[token, token], completion_mask=[0, 1], prompt_length=1)


def test_groups_reject_malformed_comparisons():
    with pytest.raises(ValueError, match="at least two"):
        ComparisonGroup((_seq(1),), is_ranking=True)
    with pytest.raises(ValueError, match="exactly two"):
        ComparisonGroup((_seq(1), _seq(2), _seq(3)))
    frame = pd.DataFrame({"prompt": [[]], "chosen": ["a"], "rejected": ["b"]})
    with pytest.raises(ValueError, match="no 'margin' column"):
        pair_groups(None, frame, 16, use_margin=True)
    for bad in (dict(max_length=1), dict(eval_batch_size=1)):
        with pytest.raises(ValueError, match="reward\\."):
            RewardSettings(**bad)


def test_gradient_accumulation_is_invariant_with_pairs_and_rankings(sft_and_groups):
    """One batch of 8 mixed comparisons and eight micro-batches of 1 make the same step."""
    model, tokenizer, pairs, rankings = sft_and_groups
    task = RewardObjective(pairs[:5] + rankings[:3], [], tokenizer.pad_token_id)
    whole, accumulated = _reward_model(model), _reward_model(model)
    settings = _settings(max_grad_norm=0.0)
    whole_grads = train_one_step(whole, task, settings)
    accumulated_grads = train_one_step(
        accumulated, task, _settings(max_grad_norm=0.0, micro_batch_size=1)
    )
    assert_same_step(whole, accumulated, whole_grads, accumulated_grads, settings.learning_rate)


def test_every_parameter_with_a_gradient_changes(sft_and_groups):
    model, tokenizer, pairs, rankings = sft_and_groups
    reward_model = _reward_model(model)
    before = {name: p.detach().clone() for name, p in reward_model.named_parameters()}
    task = RewardObjective(pairs[:16] + rankings[:4], [], tokenizer.pad_token_id)
    train(reward_model, task, _settings(max_steps=3), show_progress=False)
    assert "lm_head" not in " ".join(before)  # the LM head is dropped
    # Bradley-Terry and Plackett-Luce see only reward differences, so the score head's bias
    # gets no gradient (only float noise): every other parameter must move.
    with_gradient = [name for name in before if name != "score.bias"]
    assert len(with_gradient) == len(before) - 1
    for name, parameter in reward_model.named_parameters():
        if name in with_gradient:
            assert not torch.equal(parameter, before[name]), name


def test_accuracy_reaches_one_when_chosen_carries_a_marker(sft_and_groups, tiny_project):
    model, tokenizer, _, _ = sft_and_groups
    frame = load_validated(ProjectPaths(tiny_project), "sft")
    texts = list(frame["completion"])

    def marked_pairs(rows):
        return [
            tokenize_group(tokenizer, frame["prompt"][i], [texts[i] + " Zebra!", texts[i + 1]], 256)
            for i in rows
        ]

    task = RewardObjective(
        marked_pairs(range(0, 40)), marked_pairs(range(41, 61)), tokenizer.pad_token_id
    )
    reward_model = _reward_model(model)
    result = train(
        reward_model,
        task,
        TrainSettings(learning_rate=3e-3, batch_size=8, epochs=4, warmup_steps=2),
        show_progress=False,
    )
    assert result.history[-1]["accuracy"] == 1.0
    assert result.final_eval["eval_accuracy"] == 1.0
    assert result.final_eval["eval_margin_mean"] > 1.0


def test_saved_reward_model_scores_exactly_as_before(sft_and_groups, tmp_path):
    model, tokenizer, pairs, _ = sft_and_groups
    reward_model = _reward_model(model, seed=3)
    train(
        reward_model,
        RewardObjective(pairs[:8], [], tokenizer.pad_token_id),
        _settings(),
        show_progress=False,
    )
    sequences = [s.input_ids for group in pairs[:6] for s in group.sequences]
    before = score_token_ids(reward_model, sequences, tokenizer.pad_token_id, batch_size=5)
    reward_model.save_pretrained(tmp_path / "rm", tokenizer=tokenizer)
    reloaded = RewardModel.from_pretrained(tmp_path / "rm")
    after = score_token_ids(reloaded, sequences, tokenizer.pad_token_id, batch_size=5)
    assert torch.equal(before, after)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def test_run_reward_trains_on_pairs_and_rankings_saves_and_tracks(
    tiny_project, tiny_params, monkeypatch, mlflow_uri
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    pl_calls = []
    original = reward_task_module.plackett_luce_loss

    def spy(scores, lengths=None):
        pl_calls.append(scores.shape)
        return original(scores, lengths)

    monkeypatch.setattr(reward_task_module, "plackett_luce_loss", spy)
    paths = ProjectPaths(tiny_project)
    settings = RewardSettings(
        train=TrainSettings(
            learning_rate=3e-3,
            warmup_steps=1,
            epochs=2,
            batch_size=8,
            eval_every=3,
            checkpoint_every=2,
        )
    )
    data = DataSettings(eval_fraction=tiny_params.data.eval_fraction)
    metrics = run_reward(settings, StageContext(data, 0, tiny_project, show_progress=False))

    assert pl_calls, "the ranked set must train with Plackett-Luce"
    assert metrics["train_rankings"] > 0 and metrics["train_pairs"] > 0
    assert metrics["steps"] == 2 * -(-(metrics["train_pairs"] + metrics["train_rankings"]) // 8)
    assert 0 <= metrics["eval_accuracy"] <= 1 and "eval_margin_mean" in metrics
    assert json.loads(paths.metrics_file("reward").read_text()) == pytest.approx(metrics)
    assert (paths.plots_dir / "reward_curves.png").stat().st_size > 0
    assert not paths.checkpoints_dir("reward").exists()

    # The saved model reproduces the stage's held-out numbers, and its rewards are centred.
    reloaded = RewardModel.from_pretrained(paths.reward_model_dir)
    tokenizer = load_causal_lm(str(paths.sft_model_dir))[1]
    pairs = load_validated(paths, "preference")
    train_pairs, eval_pairs = train_eval_split(pairs, data.eval_fraction)
    eval_groups = pair_groups(tokenizer, eval_pairs, 256, False)
    again = RewardObjective(eval_groups, eval_groups, tokenizer.pad_token_id).evaluate(reloaded)
    assert again["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    assert again["eval_margin_mean"] == pytest.approx(metrics["eval_margin_mean"], rel=1e-4)
    rankings, _ = train_eval_split(load_validated(paths, "ranked"), data.eval_fraction)
    train_groups = pair_groups(tokenizer, train_pairs, 256, False)
    train_groups += ranking_groups(tokenizer, rankings, 256)
    sequences = [s.input_ids for g in train_groups for s in g.sequences]
    assert abs(float(score_token_ids(reloaded, sequences, tokenizer.pad_token_id).mean())) < 1e-4

    run_id = read_producer_run_id(paths.reward_model_dir)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.data.params["reward.train.learning_rate"] == "0.003"
    assert run.data.params["reward.use_rankings"] == "True"
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "accuracy", "margin"):
        assert len(client.get_metric_history(run_id, key)) == metrics["steps"], key
    assert client.get_metric_history(run_id, "eval/accuracy")
    tags = run.data.tags
    for name in ("preference", "ranked", "sft_model"):
        assert tags[f"input.{name}.md5"], name
    assert tags["git_commit"]
    datasets = {i.dataset.name.split("@")[0] for i in run.inputs.dataset_inputs}
    assert {"preference_train", "preference_eval", "ranked_train"} <= datasets
