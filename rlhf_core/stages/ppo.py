"""Stage `policy@ppo`: align the SFT model with PPO against the reward model.

Inputs (fixed paths): the validated `prompts` set, the SFT model (the policy's start and the
frozen reference) and the reward model (frozen). Output: `artifacts/policy/ppo`, the policy LM
(loadable alone with `load_causal_lm`) plus its value head (`PolicyWithValueHead`), with the
tokenizer. Also writes `artifacts/metrics/ppo.json`, `artifacts/plots/ppo_curves.json` (for
`dvc plots`) and `ppo_curves.png`, and logs everything to the stage's MLflow run.

On the demo task the gold judge, which the reward model never sees, also scores every
evaluation (`eval/gold_score_mean` beside `eval/score_mean`): ppo.json then holds the
overoptimisation alarm (the reward-model score rising while the gold score falls) and Gao et
al.'s RL-form fits of both curves against √KL (`evaluation.overoptimisation`). When the reward
stage trained a held-out judge (`reward.judge`) it scores every evaluation too
(`eval/judge_score_mean`), and where the data have no gold judge the alarm compares the proxy
against it (`overoptimisation_judge`). With neither, the alarm is off, which ppo.json says;
`overoptimisation/judge` names the judge it used.

Held-out prompts for the periodic evaluation come from the same stable hash split every stage
uses (`data.eval_fraction`); the `eval_prompts` set stays unseen for the evaluation stage.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from rlhf_core.config import DataSettings
from rlhf_core.config.stages import PPOSettings
from rlhf_core.evaluation.overoptimisation import (
    JUDGES,
    STATUS_METRIC,
    overoptimisation_warning,
    run_overoptimisation,
)
from rlhf_core.files import writing
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import StageContext
from rlhf_core.stages.training_stage import (
    require_inputs,
    run_training_stage,
    split_for_training,
    stage_accelerator,
)
from rlhf_core.training.ppo_trainer import PPOTrainResult

log = logging.getLogger(__name__)

STAGE = "ppo"
# Curves drawn in the PNG (all logged metrics are in the curves JSON and in MLflow).
PLOTTED_CURVES = (
    *("reward/score_mean", "kl/mean", "eval/score_mean"),
    *("eval/gold_score_mean", "eval/judge_score_mean"),
)
# The last iteration's values that go to artifacts/metrics/ppo.json.
FINAL_ITERATION_METRICS = (
    *("reward/score_mean", "reward/total_mean", "kl/mean", "kl/coef", "policy/entropy"),
    *("response/length_mean", "response/ended_fraction"),
)


def run_ppo(
    settings: PPOSettings,
    context: StageContext,
) -> dict[str, Any]:
    """Train the PPO policy; save it, its metrics and curves; return the final metrics."""
    import torch

    from rlhf_core.models.heads import PolicyWithValueHead
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.scoring import load_reward_members
    from rlhf_core.training.ppo_trainer import train_ppo
    from rlhf_core.training.rollout import PPOModels, reward_scorer, with_ensemble_std

    paths = ProjectPaths(context.root)
    inputs = {
        "prompts": paths.validated_set("prompts"),
        "sft_model": paths.sft_model_dir,
        "reward_model": paths.reward_model_dir,
    }
    require_inputs(inputs)
    train_frame, eval_frame, datasets = split_for_training(
        paths, "prompts", context.data, logged_as="ppo_prompts"
    )
    if train_frame.empty:
        raise ValueError(
            f"{inputs['prompts']}: no training prompts are left after the held-out split; "
            "add prompts or lower data.eval_fraction."
        )
    trusted = trusted_judge(settings.overoptimisation_judge, context.data, paths)
    eval_frame = eval_frame.head(settings.max_eval_prompts)
    datasets[1] = dataclasses.replace(datasets[1], frame=eval_frame)  # the prompts evaluated
    with run_training_stage(
        STAGE,
        settings,
        context,
        inputs=inputs,
        label=ppo_run_label(settings.train),
        datasets=datasets,
    ) as stage:
        # fp32 on every device (see ComputeSettings); on several processes (`launch`) each
        # rolls out its share of the prompts and the update runs under DDP (`train_ppo`).
        accelerator = stage_accelerator(context, "fp32")
        device = accelerator.device
        policy_lm, tokenizer = load_causal_lm(str(paths.sft_model_dir))
        reference, _ = load_causal_lm(str(paths.sft_model_dir))
        policy = PolicyWithValueHead(policy_lm, seed=context.seed)
        with torch.no_grad():  # V ≈ 0 at the start: no value estimate before any return is seen
            policy.value_head.weight.mul_(0.01)
        reward_members = load_reward_members(paths.reward_model_dir)  # one without an ensemble
        stage.check_outputs(policy, paths.policy_dir(STAGE))
        policy, reference = (m.to(device) for m in (policy, reference))
        scorer = reward_scorer(  # the members' aggregate (reward_aggregate) when there are several
            [member.to(device) for member in reward_members],
            tokenizer.pad_token_id,
            settings.scorer_batch_size,
            settings.reward_aggregate,
            settings.reward_std_coef,
        )
        result = train_ppo(
            PPOModels(policy, reference, scorer, tokenizer),
            list(train_frame["prompt"]),
            settings.train,
            seed=context.seed,
            eval_prompts=list(eval_frame["prompt"]),
            judges=(  # only the main process evaluates: the others never load a judge
                judge_scorers(context.data, paths, tokenizer.pad_token_id, settings, device)
                if accelerator.is_main_process
                else {}
            ),
            checkpoints=stage.checkpoint_manager(),
            on_log=with_ensemble_std(stage.log_step, scorer),
            on_eval=stage.log_eval,
            show_progress=context.show_progress,
            accelerator=accelerator,
        )
        stage.main_process_only()
        overoptimisation = run_overoptimisation(
            result.eval_history,
            settings.overoptimisation_window,
            settings.overoptimisation_epsilon,
            judge=trusted,
        )
        stage.run.set_tags(
            {
                "resumed_from": result.resumed_from,
                "overoptimisation.status": overoptimisation[STATUS_METRIC],
                "overoptimisation.judge": JUDGES.get(trusted or "", "none"),
            }
        )
        if warning := overoptimisation_warning(overoptimisation):
            log.warning("ppo: %s", warning)
        out_dir = paths.policy_dir(STAGE)
        with writing("the PPO policy", out_dir):
            policy.save_pretrained(out_dir, tokenizer=tokenizer)
        metrics = stage.finish(
            result,
            {**final_metrics(result, len(train_frame), len(eval_frame)), **overoptimisation},
            out_dir,
            shown=PLOTTED_CURVES,
            title="PPO: reward-model score and KL to SFT",
        )
    log.info(
        "ppo: %d iterations in %.0f s; final score %.3f, KL %.2f",
        result.iterations,
        result.train_seconds,
        metrics.get("reward/score_mean", float("nan")),
        metrics.get("kl/mean", float("nan")),
    )
    return metrics


def gold_scorer(data: DataSettings) -> Any:
    """The demo's gold judge as a PPO scorer of response texts, or None off the demo (user
    data has no judge the reward model never saw)."""
    if data.source != "demo":
        return None
    import torch

    from rlhf_core.data.gold import GoldJudge

    judge = GoldJudge()
    return lambda rollout: torch.tensor(judge.score_batch(rollout.texts))


def trusted_judge(choice: str, data: DataSettings, paths: ProjectPaths) -> str | None:
    """The judge the overoptimisation alarm compares the proxy with (`JUDGES` key), None when
    there is none; one error line when `choice` names a judge this project lacks."""
    from rlhf_core.scoring import has_judge

    has = {"gold": data.source == "demo", "judge": has_judge(paths.reward_model_dir)}
    if choice == "auto":
        return next((name for name in ("gold", "judge") if has[name]), None)
    if not has[choice]:
        raise ValueError(
            "policy.ppo.overoptimisation_judge is gold, but only the demo's data have a gold "
            "judge; use judge (with reward.judge.enabled: true) or auto"
            if choice == "gold"
            else "policy.ppo.overoptimisation_judge is judge, but the reward stage trained no "
            "held-out judge (artifacts/reward/judge); set reward.judge.enabled: true and "
            "rerun the reward stage, or use auto"
        )
    return choice


def judge_scorers(
    data: DataSettings, paths: ProjectPaths, pad_id: int, settings: PPOSettings, device: Any
) -> dict[str, Any]:
    """Every judge that scores PPO's evaluations, by `JUDGES` key: the demo's gold judge and
    the reward stage's held-out judge, where they exist."""
    from rlhf_core.scoring import load_judge
    from rlhf_core.training.rollout import reward_model_scorer

    judges = {}
    if (gold := gold_scorer(data)) is not None:
        judges["gold"] = gold
    if (judge := load_judge(paths.reward_model_dir)) is not None:
        judges["judge"] = reward_model_scorer(judge.to(device), pad_id, settings.scorer_batch_size)
    return judges


def ppo_run_label(train: Any) -> str:
    """The key knobs of a PPO run, for its MLflow run name: estimator, KL control, lr."""
    kl = (
        f"target_kl={train.target_kl:g}" if train.adaptive_kl else f"kl_coef={train.init_kl_coef:g}"
    )
    return f"{train.advantage_estimator} {kl} lr={train.learning_rate:g}"


def final_metrics(result: PPOTrainResult, train_prompts: int, eval_prompts: int) -> dict:
    """The stage's DVC metrics: the last iteration's rollout stats, the final evaluation (with
    the evaluation before training for comparison) and the time split of the whole run."""
    last = result.history[-1]
    metrics: dict[str, Any] = {
        "iterations": result.iterations,
        "resumed_from": result.resumed_from,
        "train_prompts": train_prompts,
        "eval_prompts": eval_prompts,
        "train_seconds": result.train_seconds,
    }
    metrics.update({key: last[key] for key in FINAL_ITERATION_METRICS})
    for key in ("time/generation_s", "time/scoring_s", "time/update_s"):
        metrics[f"{key[:-2]}_total_s"] = sum(row[key] for row in result.history)
    metrics.update(_prefixed(result.final_eval))
    if result.eval_history and result.eval_history[0]["step"] == 0:
        initial = {k: v for k, v in result.eval_history[0].items() if k != "step"}
        metrics.update({f"eval_initial/{k}": v for k, v in initial.items()})
    return metrics


def _prefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {f"eval/{key}": value for key, value in metrics.items()}
