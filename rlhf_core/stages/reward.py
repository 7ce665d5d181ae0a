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

With `ensemble.members` k > 1 the stage trains k reward models one after another in its one
MLflow run (Coste et al. 2023, arXiv:2310.02743). Member 0 is exactly the single model above
(global seed, every training comparison) and stays at artifacts/reward, so whatever loads one
reward model is unchanged; member i ≥ 1 starts from the same SFT model with the seed
`derived_seed(seed, "reward/member", i)` (its score head and data order) and, with
`ensemble.bootstrap`, trains on a bootstrap resample of the training comparisons
(`algorithms.ensemble.bootstrap_indices`). Each member is centred on the same training
responses, so their offsets agree and their spread is disagreement, not offset. Members go
to artifacts/reward/members/<i>/ and `ensemble.json` lists them all (`scoring`); their curves
are logged as `member_<i>/…`, and reward.json adds `member_<i>/eval_accuracy` (and the other
held-out numbers) per member and `ensemble/eval_accuracy` etc. of the members' mean score.

With `judge.enabled` the training prompts are split in two (`data.splits.judge_split`, by
prompt): the reward model (and every member) trains on one part, and a held-out judge, a
reward model trained the same way from the SFT model with its own seed, on the other. It goes
to artifacts/reward/judge/, its curves are logged as `judge/…` and reward.json adds
`judge/eval_accuracy` etc. on the same held-out pairs. PPO scores its evaluations with it and,
where the data have no gold judge, its overoptimisation alarm compares the proxy against it.

Resuming: member 0 resumes from its checkpoints as the single model does. A member i ≥ 1 (or
the judge) that finished is kept under .checkpoints/reward/member-<i>/final (judge/final) with
its metrics and loaded instead of retrained; the one that was training resumes from its own
checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from rlhf_core.config.reward import RewardSettings
from rlhf_core.files import write_json, writing
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import StageContext
from rlhf_core.stages.training_stage import (
    LoggedDataset,
    TrainingStage,
    eval_metric_name,
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
    judge_pairs = pd.DataFrame()
    if settings.judge.enabled:
        train_pairs, judge_pairs = split_judge_pairs(train_pairs, settings, context)
        datasets[0] = dataclasses.replace(datasets[0], frame=train_pairs)
        datasets.append(
            LoggedDataset("preference_judge", judge_pairs, "training", datasets[0].source)
        )
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
    if settings.ensemble.members > 1 and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError(
            "reward.ensemble.members > 1 trains the members one after another in one process; "
            "run the reward stage with launch.num_processes: 1 or set members: 1"
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
        if settings.ensemble.members > 1:
            metrics.update(
                train_members(
                    stage,
                    settings,
                    reward_model,
                    metrics,
                    tokenizer,
                    objective,
                    train_groups,
                )
            )
            stage.run.set_tags({"resumed_from": result.resumed_from})  # member 0's, as k = 1
        if settings.judge.enabled:
            judge_groups = pair_groups(
                tokenizer, judge_pairs, settings.max_length, settings.use_margin
            )
            metrics.update(train_judge(stage, settings, tokenizer, objective, judge_groups))
            metrics["judge/train_pairs"] = len(judge_pairs)
        return stage.finish(
            result,
            metrics,
            out_dir,
            shown=("loss", "accuracy", "eval/loss", "eval/accuracy"),
            title="Reward model",
        )


# --------------------------------------------------------------------------------------------
# Ensemble members (reward.ensemble.members > 1)
# --------------------------------------------------------------------------------------------

MEMBER_METRICS = ("train_loss", "train_accuracy", "steps", "resumed_from", "reward_offset")


def member_seed(seed: int, index: int) -> int:
    """The seed of ensemble member `index`: the global seed for member 0 (the single model),
    an independent stream `derived_seed(seed, "reward/member", index)` for the others."""
    from rlhf_core.generation import derived_seed

    return seed if index == 0 else derived_seed(seed, "reward/member", index)


@dataclasses.dataclass
class MemberStage(TrainingStage):
    """The reward stage's run seen by one more reward model it trains (ensemble member i, or
    the judge): its curves are logged as `<prefix><name>` (`member_<i>/`, `judge/`) beside
    member 0's, and its checkpoints are its own."""

    prefix: str = ""

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        logged = {self.prefix + k: v for k, v in metrics.items() if k != "tokens"}
        self.run.log_metrics(logged, step)

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        logged = {self.prefix + eval_metric_name(k): v for k, v in metrics.items()}
        self.run.log_metrics(logged, step)


def extra_model_stage(
    stage: TrainingStage, prefix: str, seed: int, work: Path, keep: int
) -> MemberStage:
    """`stage` as seen by one more reward model: its metric prefix, seed and checkpoints."""
    from rlhf_core.training.checkpoint import CheckpointManager

    extra = MemberStage(
        **{f.name: getattr(stage, f.name) for f in dataclasses.fields(TrainingStage)},
        prefix=prefix,
    )
    extra.context = dataclasses.replace(stage.context, seed=seed)
    extra.checkpoints = CheckpointManager(
        work, keep=keep, fingerprint=f"{stage.fingerprint}/{work.name}"
    )
    return extra


def train_members(
    stage: TrainingStage,
    settings: RewardSettings,
    first: Any,
    first_metrics: Mapping[str, Any],
    tokenizer: Any,
    objective: Any,
    train_groups: Sequence[ComparisonGroup],
) -> dict[str, Any]:
    """Train members 1 … k−1 (member 0, `first`, is trained and saved), save each under
    artifacts/reward/members/<i>, write the manifest; return the per-member and ensemble
    metrics for reward.json."""
    from rlhf_core.algorithms.ensemble import bootstrap_indices
    from rlhf_core.generation import eval_mode
    from rlhf_core.models.heads import RewardEnsemble
    from rlhf_core.scoring import member_dir, write_ensemble_manifest

    paths, context = stage.paths, stage.context
    members = [first]
    metrics = {f"member_0/{k}": v for k, v in _member_summary(first_metrics).items()}
    seeds = [member_seed(context.seed, i) for i in range(settings.ensemble.members)]
    for index in range(1, settings.ensemble.members):
        groups = list(train_groups)
        if settings.ensemble.bootstrap:
            groups = [groups[i] for i in bootstrap_indices(len(groups), seeds[index])]
        member, member_metrics = _train_or_resume(
            stage,
            settings,
            tokenizer,
            objective,
            name=f"member {index}",
            prefix=f"member_{index}/",
            work=paths.checkpoints_dir(STAGE) / f"member-{index}",
            seed=seeds[index],
            groups=groups,
            centre_groups=train_groups,
        )
        members.append(member)
        metrics.update({f"member_{index}/{k}": v for k, v in member_metrics.items()})
    for index, member in enumerate(members[1:], start=1):
        out_dir = member_dir(paths.reward_model_dir, index)
        with writing(f"reward ensemble member {index}", out_dir):
            member.save_pretrained(out_dir)
    write_ensemble_manifest(paths.reward_model_dir, seeds, settings.ensemble.bootstrap)
    ensemble = RewardEnsemble(members)
    with eval_mode(ensemble):
        ensemble_eval = objective.evaluate(ensemble)  # of the members' mean score
    metrics["ensemble/members"] = len(members)
    metrics.update({f"ensemble/{k}": v for k, v in ensemble_eval.items()})
    return metrics


def _train_or_resume(
    stage: TrainingStage,
    settings: RewardSettings,
    tokenizer: Any,
    objective: Any,
    *,
    name: str,
    prefix: str,
    work: Path,
    seed: int,
    groups: list[ComparisonGroup],
    centre_groups: Sequence[ComparisonGroup],
) -> tuple[Any, dict[str, Any]]:
    """One more reward model of the stage (an ensemble member or the judge): the one an
    interrupted run finished and kept in `work`, else trained on `groups` (curves under
    `prefix`, checkpoints in `work`) and kept in `work/final` until the stage ends well."""
    finished = _finished_member(work, stage.fingerprint)
    if finished is not None:
        log.info("reward: %s finished before the interruption; loading it", name)
        return finished
    extra = extra_model_stage(stage, prefix, seed, work, settings.train.keep_checkpoints)
    model, metrics = _train_member(
        extra, settings, tokenizer, objective, groups, centre_groups, seed
    )
    model.save_pretrained(work / "final")
    write_json(
        work / "final.json",
        {"fingerprint": stage.fingerprint, "metrics": metrics},
        what=f"the reward {name}'s record",
    )
    return model, metrics


def _finished_member(work: Path, fingerprint: str) -> tuple[Any, dict[str, Any]] | None:
    """(the member, its metrics) that an interrupted run with the same fingerprint finished
    and kept in `work`, else None."""
    from rlhf_core.models.heads import RewardModel

    record_file, model_dir = work / "final.json", work / "final"
    if not (record_file.is_file() and model_dir.is_dir()):
        return None
    record = json.loads(record_file.read_text())
    if record.get("fingerprint") != fingerprint:
        return None
    return RewardModel.from_pretrained(model_dir), record["metrics"]


def _train_member(
    stage: MemberStage,
    settings: RewardSettings,
    tokenizer: Any,
    objective: Any,
    groups: list[ComparisonGroup],
    centre_groups: Sequence[ComparisonGroup],
    seed: int,
) -> tuple[Any, dict[str, Any]]:
    """One member from the SFT model: trained on `groups`, centred on `centre_groups` (every
    member on the same responses); returns it and its summary metrics."""
    from rlhf_core.models.heads import RewardModel
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.training.objectives.reward import RewardObjective

    causal_lm, _ = load_causal_lm(str(stage.paths.sft_model_dir))
    member = RewardModel.from_causal_lm(causal_lm, seed=seed)
    del causal_lm
    member_objective = RewardObjective(
        groups,
        objective.eval_groups,
        tokenizer.pad_token_id,
        use_margin=settings.use_margin,
        eval_batch_size=settings.eval_batch_size,
    )
    name = stage.prefix.rstrip("/").replace("_", " ")
    result = stage.train(member, member_objective, description=f"reward {name}")
    centering = (
        center_score_head(member, centre_groups, tokenizer.pad_token_id)
        if settings.center_rewards
        else {}
    )
    last = result.history[-1] if result.history else {}
    summary = {
        **result.summary(),
        "train_loss": last.get("loss"),
        "train_accuracy": last.get("accuracy"),
        **{k: v for k, v in result.final_eval.items() if k != "step"},
        **centering,
    }
    return member, _member_summary(summary)


def _member_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers reward.json keeps per member: held-out metrics and a few training ones."""
    return {k: v for k, v in metrics.items() if k.startswith("eval_") or k in MEMBER_METRICS}


# --------------------------------------------------------------------------------------------
# The held-out judge (reward.judge.enabled)
# --------------------------------------------------------------------------------------------


def split_judge_pairs(
    train_pairs: pd.DataFrame, settings: RewardSettings, context: StageContext
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the reward model's training pairs, the judge's): `judge_split` by prompt, with one
    error line when either side would be empty."""
    from rlhf_core.data.splits import judge_split

    proxy_pairs, judge_pairs = judge_split(
        train_pairs, settings.judge.share, context.data.split_salt
    )
    if proxy_pairs.empty or judge_pairs.empty:
        raise ValueError(
            f"reward.judge.share {settings.judge.share:g} of {len(train_pairs)} training pairs "
            f"leaves the reward model {len(proxy_pairs)} and the judge {len(judge_pairs)}; "
            "both need pairs: add data or move the share towards 0.5"
        )
    log.info(
        "reward: the held-out judge trains on %d pairs, the reward model on %d (disjoint prompts)",
        len(judge_pairs),
        len(proxy_pairs),
    )
    return proxy_pairs, judge_pairs


def train_judge(
    stage: TrainingStage,
    settings: RewardSettings,
    tokenizer: Any,
    objective: Any,
    judge_groups: Sequence[ComparisonGroup],
) -> dict[str, Any]:
    """Train the held-out judge on `judge_groups` (or load the one an interrupted run
    finished), save it to artifacts/reward/judge; return its `judge/…` metrics."""
    from rlhf_core.generation import derived_seed
    from rlhf_core.scoring import judge_dir

    judge, judge_metrics = _train_or_resume(
        stage,
        settings,
        tokenizer,
        objective,
        name="judge",
        prefix="judge/",
        work=stage.paths.checkpoints_dir(STAGE) / "judge",
        seed=derived_seed(stage.context.seed, "reward/judge"),
        groups=list(judge_groups),
        centre_groups=judge_groups,
    )
    out_dir = judge_dir(stage.paths.reward_model_dir)
    with writing("the held-out reward judge", out_dir):
        judge.save_pretrained(out_dir)
    return {f"judge/{k}": v for k, v in judge_metrics.items()}
