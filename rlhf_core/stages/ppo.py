"""Stage `policy@ppo`: align the SFT model with PPO against the reward model.

Inputs (fixed paths): the validated `prompts` set, the SFT model (the policy's start and the
frozen reference) and the reward model (frozen). Output: `artifacts/policy/ppo`, the policy LM
(loadable alone with `load_causal_lm`) plus its value head (`PolicyWithValueHead`), with the
tokenizer. Also writes `artifacts/metrics/ppo.json`, `artifacts/plots/ppo_curves.json` (for
`dvc plots`) and `ppo_curves.png`, and logs everything to the stage's MLflow run.

Held-out prompts for the periodic evaluation come from the same stable hash split every stage
uses (`data.eval_fraction`); the `eval_prompts` set stays unseen for the evaluation stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core.files import write_json
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import load_validated, train_eval_split
from rlhf_core.stages.settings import PPOSettings
from rlhf_core.training.ppo_trainer import PPOTrainResult

if TYPE_CHECKING:  # rlhf_core.config imports this module for its settings class
    from rlhf_core.config import DataParams

log = logging.getLogger(__name__)

STAGE = "ppo"
# Curves drawn in the PNG (all logged metrics are in the curves JSON and in MLflow).
PLOTTED_CURVES = ("reward/score_mean", "kl/mean", "eval/score_mean")


def run_ppo(
    settings: PPOSettings,
    *,
    data: DataParams,
    seed: int,
    root: Path = Path("."),
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train the PPO policy; save it, its metrics and curves; return the final metrics."""
    import torch

    from rlhf_core.models.heads import PolicyWithValueHead, RewardModel
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.tracking.lineage import path_md5
    from rlhf_core.tracking.runs import stage_run
    from rlhf_core.training.checkpoint import CheckpointManager
    from rlhf_core.training.loop import seed_everything
    from rlhf_core.training.ppo_trainer import train_ppo
    from rlhf_core.training.rollout import reward_model_scorer

    paths = ProjectPaths(Path(root))
    inputs = {
        "prompts": paths.validated_set("prompts"),
        "sft_model": paths.sft_model_dir,
        "reward_model": paths.reward_model_dir,
    }
    _require_inputs(inputs)
    prompts_file = inputs["prompts"] / "valid.parquet"
    frame = load_validated(paths, "prompts")
    train_frame, eval_frame = train_eval_split(frame, data.eval_fraction, data.split_salt)
    if train_frame.empty:
        raise ValueError(
            f"{prompts_file}: no training prompts are left after the held-out split; "
            "add prompts or lower data.eval_fraction."
        )
    eval_frame = eval_frame.head(settings.max_eval_prompts)
    seed_everything(seed)
    policy_lm, tokenizer = load_causal_lm(str(paths.sft_model_dir))
    reference, _ = load_causal_lm(str(paths.sft_model_dir))
    policy = PolicyWithValueHead(policy_lm, seed=seed)
    with torch.no_grad():  # V ≈ 0 at the start: no value estimate before any return is seen
        policy.value_head.weight.mul_(0.01)
    reward_model = RewardModel.from_pretrained(paths.reward_model_dir).eval()
    reward_model.requires_grad_(False)
    scorer = reward_model_scorer(reward_model, tokenizer.pad_token_id, settings.scorer_batch_size)
    fingerprint = _fingerprint(settings, data, seed, {k: path_md5(p) for k, p in inputs.items()})
    checkpoints = CheckpointManager(
        paths.checkpoints_dir(STAGE), settings.train.keep_checkpoints, fingerprint
    )
    params = {
        STAGE: dataclasses.asdict(settings),
        "data.eval_fraction": data.eval_fraction,
        "seed": seed,
    }
    out_dir = paths.policy_dir(STAGE)
    with stage_run(
        STAGE,
        project_root=paths.root,
        params=params,
        inputs=inputs,
        label=ppo_run_label(settings.train),
    ) as run:
        run.log_dataset(train_frame, "ppo_prompts_train", "training", source=prompts_file)
        if not eval_frame.empty:
            run.log_dataset(eval_frame, "ppo_prompts_eval", "evaluation", source=prompts_file)
        result = train_ppo(
            policy,
            reference,
            scorer,
            tokenizer,
            list(train_frame["prompt"]),
            settings.train,
            seed=seed,
            eval_prompts=list(eval_frame["prompt"]),
            checkpoints=checkpoints,
            on_log=lambda step, metrics: run.log_metrics(metrics, step),
            on_eval=lambda step, metrics: run.log_metrics(_prefixed(metrics), step),
            show_progress=show_progress,
        )
        policy.save_pretrained(out_dir, tokenizer=tokenizer)
        metrics = final_metrics(result, len(train_frame), len(eval_frame))
        write_json(paths.metrics_file(STAGE), metrics)
        _write_curves(run, result, paths)
        run.log_model_dir(out_dir, "model")
        run.record_output(out_dir)
    checkpoints.clear()
    log.info(
        "ppo: %d iterations in %.0f s; final score %.3f, KL %.2f",
        result.iterations,
        result.train_seconds,
        metrics.get("reward/score_mean", float("nan")),
        metrics.get("kl/mean", float("nan")),
    )
    return metrics


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
    for key in (
        "reward/score_mean",
        "reward/total_mean",
        "kl/mean",
        "kl/coef",
        "policy/entropy",
        "response/length_mean",
        "response/ended_fraction",
    ):
        metrics[key] = last[key]
    for key in ("time/generation_s", "time/scoring_s", "time/update_s"):
        metrics[f"{key[:-2]}_total_s"] = sum(row[key] for row in result.history)
    metrics.update(_prefixed(result.final_eval))
    if result.eval_history and result.eval_history[0]["step"] == 0:
        initial = {k: v for k, v in result.eval_history[0].items() if k != "step"}
        metrics.update({f"eval_initial/{k}": v for k, v in initial.items()})
    return metrics


def curves(result: PPOTrainResult) -> dict[str, list[tuple[int, float]]]:
    """Every logged series as {name: [(iteration, value), ...]}; eval series as `eval/<name>`."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in result.history:
        for key, value in row.items():
            if key != "step":
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    for row in result.eval_history:
        for key, value in row.items():
            if key != "step":
                series.setdefault(f"eval/{key}", []).append((int(row["step"]), float(value)))
    return series


def _write_curves(run, result: PPOTrainResult, paths: ProjectPaths) -> None:
    from rlhf_core.evaluation.report import curves_figure, write_curves_json

    history = curves(result)
    curves_file = write_curves_json(history, paths.plots_dir / f"{STAGE}_curves.json")
    run.log_artifact(curves_file, "plots")
    plotted = {name: history[name] for name in PLOTTED_CURVES if name in history}
    figure = curves_figure(plotted, "PPO: reward-model score and KL to SFT")
    png = paths.plots_dir / f"{STAGE}_curves.png"
    figure.savefig(png, dpi=100)
    run.log_figure(figure, f"plots/{STAGE}_curves.png")


def _prefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {f"eval/{key}": value for key, value in metrics.items()}


def _fingerprint(
    settings: PPOSettings, data: DataParams, seed: int, input_md5s: dict[str, str]
) -> str:
    """sha256 of everything that shapes the run, so a changed run never resumes a stale one."""
    payload = {
        "settings": dataclasses.asdict(settings),
        "data": {"eval_fraction": data.eval_fraction, "split_salt": data.split_salt},
        "seed": seed,
        "inputs": input_md5s,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _require_inputs(inputs: dict[str, Path]) -> None:
    hints = {
        "prompts": "run `rlhf stage validate` first",
        "sft_model": "run `rlhf stage sft` first",
        "reward_model": "run `rlhf stage reward` first",
    }
    for name, path in inputs.items():
        if not path.exists():
            raise FileNotFoundError(f"{path}: the PPO {name} input is missing; {hints[name]}.")
