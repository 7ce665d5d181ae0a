"""`rlhf stage reward`: train the reward model on preference pairs (and rankings).

Inputs: the validated `preference` set, the validated `ranked` set when it exists and
`use_rankings` is on, and the SFT model (artifacts/sft), whose transformer initialises the
reward model (`RewardModel.from_causal_lm`: the LM head is dropped, a scalar head is added).
Pairs train with Bradley–Terry (optionally with the data's `margin`), rankings with
Plackett–Luce, in one likelihood (`training.objectives.reward`). Output: the reward model at
artifacts/reward (`RewardModel.save_pretrained`, with the tokenizer), held-out accuracy and
margin in artifacts/metrics/reward.json, curves for DVC plots and a PNG, and an MLflow run.

Both losses only see reward differences, so a reward model's offset is arbitrary; with
`center_rewards` the score head's bias is shifted after training so that the mean reward of
the training responses is 0, which keeps PPO's rewards centred. Rankings and accuracy are
unchanged by the shift.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from rlhf_core.config.stages import RewardSettings
from rlhf_core.files import writing
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import StageContext
from rlhf_core.stages.training_stage import (
    run_training_stage,
    split_for_training,
    training_label,
)
from rlhf_core.training.objectives.reward import ComparisonGroup, RewardObjective, tokenize_group

log = logging.getLogger(__name__)

STAGE = "reward"


def pair_groups(
    tokenizer: Any, frame: pd.DataFrame, max_length: int, use_margin: bool
) -> list[ComparisonGroup]:
    """One (chosen, rejected) group per preference row; margin 0 where the data has none."""
    if use_margin and "margin" not in frame.columns:
        raise ValueError(
            "reward.use_margin is true but the preference set has no 'margin' column; "
            "add margins to the data or set use_margin: false"
        )
    margins = frame["margin"] if use_margin else [0.0] * len(frame)
    return [
        tokenize_group(
            tokenizer,
            prompt,
            [chosen, rejected],
            max_length,
            margin=0.0 if margin is None or math.isnan(margin) else float(margin),
        )
        for prompt, chosen, rejected, margin in zip(
            frame["prompt"], frame["chosen"], frame["rejected"], margins, strict=True
        )
    ]


def ranking_groups(tokenizer: Any, frame: pd.DataFrame, max_length: int) -> list[ComparisonGroup]:
    """One group per ranked row, responses best first."""
    return [
        tokenize_group(tokenizer, prompt, responses, max_length, is_ranking=True)
        for prompt, responses in zip(frame["prompt"], frame["responses"], strict=True)
    ]


def center_score_head(reward_model: Any, groups: Sequence[ComparisonGroup], pad_id: int) -> dict:
    """Shift the score head's bias so the mean reward of every sequence in `groups` is 0.

    Returns {"reward_offset": the mean before the shift, "train_reward_std": the spread}.
    """
    from rlhf_core.scoring import score_token_ids

    sequences = [s.input_ids for group in groups for s in group.sequences]
    rewards = score_token_ids(reward_model, sequences, pad_id)  # (sequences,)
    offset = float(rewards.mean())
    with torch.no_grad():
        reward_model.score.bias -= offset
    return {"reward_offset": offset, "train_reward_std": float(rewards.std())}


def run_reward(
    settings: RewardSettings,
    context: StageContext,
) -> dict:
    """Train the reward model from the SFT model; write the model, metrics and curves.

    Resumes an interrupted run (`training_stage`); returns the metrics of reward.json.
    """
    from rlhf_core.models.heads import RewardModel
    from rlhf_core.models.loading import load_causal_lm

    paths = ProjectPaths(context.root)
    train_pairs, eval_pairs, datasets = split_for_training(paths, "preference", context.data)
    inputs = {"preference": paths.validated_set("preference"), "sft_model": paths.sft_model_dir}
    train_rankings = eval_rankings = pd.DataFrame()
    if settings.use_rankings and (paths.validated_set("ranked") / "valid.parquet").is_file():
        train_rankings, eval_rankings, logged = split_for_training(paths, "ranked", context.data)
        datasets += logged
        inputs["ranked"] = paths.validated_set("ranked")
    if len(train_pairs) + len(train_rankings) == 0:
        raise ValueError(
            "no training comparisons: the preference (and ranked) sets are empty or all "
            "held out; add data or lower eval_fraction"
        )
    with run_training_stage(
        STAGE,
        settings,
        context,
        inputs=inputs,
        label=training_label(settings.train),
        datasets=datasets,
    ) as stage:
        causal_lm, tokenizer = load_causal_lm(str(paths.sft_model_dir))
        reward_model = RewardModel.from_causal_lm(causal_lm, seed=context.seed)
        del causal_lm  # its LM head is not part of the reward model
        stage.check_outputs(reward_model, paths.reward_model_dir)

        train_groups = pair_groups(tokenizer, train_pairs, settings.max_length, settings.use_margin)
        eval_groups = pair_groups(tokenizer, eval_pairs, settings.max_length, settings.use_margin)
        if len(train_rankings) + len(eval_rankings):
            train_groups += ranking_groups(tokenizer, train_rankings, settings.max_length)
            eval_groups += ranking_groups(tokenizer, eval_rankings, settings.max_length)
        responses = [
            sequence for group in train_groups + eval_groups for sequence in group.sequences
        ]
        cut_ends = stage.count_cut_ends(responses, "responses")
        objective = RewardObjective(
            train_groups,
            eval_groups,
            tokenizer.pad_token_id,
            use_margin=settings.use_margin,
            eval_batch_size=settings.eval_batch_size,
        )
        result = stage.train(
            reward_model,
            objective,
            description="reward",
        )
        centering = (
            center_score_head(reward_model, train_groups, tokenizer.pad_token_id)
            if settings.center_rewards
            else {}
        )
        out_dir = paths.reward_model_dir
        with writing("the reward model", out_dir):
            reward_model.save_pretrained(out_dir, tokenizer=tokenizer)
        last = result.history[-1] if result.history else {}
        metrics = {
            "train_pairs": len(train_pairs),
            "train_rankings": len(train_rankings),
            "eval_pairs": len(eval_pairs),
            "eval_rankings": len(eval_rankings),
            "truncated_ends": cut_ends,
            **result.summary(),
            "train_loss": last.get("loss"),
            "train_accuracy": last.get("accuracy"),
            **{k: v for k, v in result.final_eval.items() if k != "step"},
            **centering,
        }
        return stage.finish(
            result,
            metrics,
            out_dir,
            shown=("loss", "accuracy", "eval/loss", "eval/accuracy"),
            title="Reward model",
        )
