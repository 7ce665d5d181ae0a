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

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from rlhf_core.files import write_json
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import (
    eval_metric_name,
    load_validated,
    run_fingerprint,
    train_eval_split,
    training_curves,
    training_label,
    write_curve_plots,
)
from rlhf_core.stages.settings import RewardSettings
from rlhf_core.training.checkpoint import CheckpointManager
from rlhf_core.training.loop import seed_everything, train
from rlhf_core.training.objectives.reward import ComparisonGroup, RewardTask, tokenize_group

if TYPE_CHECKING:  # config imports this module for its settings class
    from rlhf_core.config import DataParams

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
    from rlhf_core.generation import score_token_ids

    sequences = [s.input_ids for group in groups for s in group.sequences]
    rewards = score_token_ids(reward_model, sequences, pad_id)  # (sequences,)
    offset = float(rewards.mean())
    with torch.no_grad():
        reward_model.score.bias -= offset
    return {"reward_offset": offset, "train_reward_std": float(rewards.std())}


def run_reward(
    settings: RewardSettings,
    *,
    data: DataParams,
    seed: int,
    root: Path = Path("."),
    show_progress: bool = True,
) -> dict:
    """Train the reward model from the SFT model; write the model, metrics and curves.

    Resumes from the newest checkpoint of an interrupted run with the same settings and
    inputs. Returns the final metrics (also written to artifacts/metrics/reward.json).
    """
    from rlhf_core.models.heads import RewardModel
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.tracking.runs import stage_run

    paths = ProjectPaths(root)
    pairs = load_validated(paths, "preference")
    train_pairs, eval_pairs = train_eval_split(pairs, data.eval_fraction, data.split_salt)
    inputs = {"preference": paths.validated_set("preference"), "sft_model": paths.sft_model_dir}
    rankings = pd.DataFrame()
    ranked_file = paths.validated_set("ranked") / "valid.parquet"
    if settings.use_rankings and ranked_file.is_file():
        rankings = load_validated(paths, "ranked")
        inputs["ranked"] = paths.validated_set("ranked")
    train_rankings, eval_rankings = (
        train_eval_split(rankings, data.eval_fraction, data.split_salt)
        if len(rankings)
        else (rankings, rankings)
    )
    if len(train_pairs) + len(train_rankings) == 0:
        raise ValueError(
            "no training comparisons: the preference (and ranked) sets are empty or all "
            "held out; add data or lower eval_fraction"
        )
    if not paths.sft_model_dir.is_dir():
        raise FileNotFoundError(f"{paths.sft_model_dir}: not found; run `rlhf stage sft` first")
    train_settings = dataclasses.replace(settings.train, seed=seed)
    params = {
        STAGE: dataclasses.asdict(settings),
        "data.eval_fraction": data.eval_fraction,
        "data.split_salt": data.split_salt,
        "seed": seed,
    }
    with stage_run(
        STAGE,
        project_root=root,
        params=params,
        inputs=inputs,
        label=training_label(settings.train),
    ) as run:
        for name, frame, context in (
            ("preference_train", train_pairs, "training"),
            ("preference_eval", eval_pairs, "evaluation"),
            ("ranked_train", train_rankings, "training"),
            ("ranked_eval", eval_rankings, "evaluation"),
        ):
            if len(frame):
                kind = name.split("_")[0]
                source = paths.validated_set(kind) / "valid.parquet"
                run.log_dataset(frame, name, context=context, source=source)
        seed_everything(seed)
        causal_lm, tokenizer = load_causal_lm(str(paths.sft_model_dir))
        reward_model = RewardModel.from_causal_lm(causal_lm, seed=seed)
        del causal_lm  # its LM head is not part of the reward model

        train_groups = pair_groups(tokenizer, train_pairs, settings.max_length, settings.use_margin)
        eval_groups = pair_groups(tokenizer, eval_pairs, settings.max_length, settings.use_margin)
        if len(rankings):
            train_groups += ranking_groups(tokenizer, train_rankings, settings.max_length)
            eval_groups += ranking_groups(tokenizer, eval_rankings, settings.max_length)
        task = RewardTask(
            train_groups,
            eval_groups,
            tokenizer.pad_token_id,
            use_margin=settings.use_margin,
            eval_batch_size=settings.eval_batch_size,
        )
        checkpoints = CheckpointManager(
            paths.checkpoints_dir(STAGE),
            keep=train_settings.keep_checkpoints,
            fingerprint=run_fingerprint(settings, data, seed, inputs),
        )

        def on_log(step: int, metrics: dict[str, float]) -> None:
            run.log_metrics({k: v for k, v in metrics.items() if k != "tokens"}, step)

        def on_eval(step: int, metrics: dict[str, float]) -> None:
            run.log_metrics({eval_metric_name(k): v for k, v in metrics.items()}, step)

        result = train(
            reward_model,
            task,
            train_settings,
            checkpoints=checkpoints,
            on_log=on_log,
            on_eval=on_eval,
            description="reward",
            show_progress=show_progress,
        )
        run.set_tags({"resumed_from": result.resumed_from})
        centering = (
            center_score_head(reward_model, train_groups, tokenizer.pad_token_id)
            if settings.center_rewards
            else {}
        )
        out_dir = paths.reward_model_dir
        reward_model.save_pretrained(out_dir, tokenizer=tokenizer)
        last = result.history[-1] if result.history else {}
        metrics = {
            "train_pairs": len(train_pairs),
            "train_rankings": len(train_rankings),
            "eval_pairs": len(eval_pairs),
            "eval_rankings": len(eval_rankings),
            "steps": result.global_step,
            "resumed_from": result.resumed_from,
            "train_seconds": round(result.train_seconds, 3),
            "mean_tokens_per_s": (
                result.tokens / result.train_seconds if result.train_seconds else 0.0
            ),
            "train_loss": last.get("loss"),
            "train_accuracy": last.get("accuracy"),
            **{k: v for k, v in result.final_eval.items() if k != "step"},
            **centering,
        }
        write_json(paths.metrics_file(STAGE), metrics)
        run.log_metrics(
            {k: v for k, v in metrics.items() if isinstance(v, int | float)}, result.global_step
        )
        write_curve_plots(
            run,
            training_curves(result.history, result.eval_history),
            paths,
            STAGE,
            ("loss", "accuracy", "eval/loss", "eval/accuracy"),
            "Reward model",
        )
        run.log_artifact(paths.metrics_file(STAGE), "metrics")
        run.log_model_dir(out_dir, "model")
        run.record_output(out_dir)
    checkpoints.clear()
    return metrics
