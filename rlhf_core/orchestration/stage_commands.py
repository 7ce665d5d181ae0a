"""`rlhf stage <name>`: the commands DVC runs, one per stage of dvc.yaml.

Kept apart from the rest of the CLI so that the warm stage server (`warm_stages`) runs them
without loading the flow launchers.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rlhf_core.orchestration.command_support import (
    ParamsOption,
    configure_logging,
    fail,
    load_params_or_exit,
)

stage_app = typer.Typer(
    help="Run one pipeline stage (DVC calls exactly these; see dvc.yaml).", no_args_is_help=True
)


@stage_app.callback()
def _stage_logging() -> None:
    configure_logging(verbose=False)  # run alone (the warm stage server); no-op under `rlhf`


@stage_app.command("prepare")
def stage_prepare(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Write the raw data sets (demo task or user files) and the base model to fixed paths."""
    from rlhf_core.stages.prepare import run_prepare

    summary = _run_stage(run_prepare, params_path, "prepare")
    typer.echo(json.dumps(summary, indent=2))


@stage_app.command("validate")
def stage_validate(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Validate every raw data set into data/validated/<set> (report, rows, quarantine, docs)."""
    from rlhf_core.stages.validate import run_validate

    summary = _run_stage(run_validate, params_path, "validate")
    typer.echo(json.dumps(summary, indent=2))
    if not summary["passed"]:
        for name, counts in summary["sets"].items():
            if not counts["passed"]:
                typer.secho(validation_failure(name, counts), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)


def validation_failure(name: str, counts: dict) -> str:
    """Why a validated set failed, in one line: its valid share, the threshold, the top
    reasons and where the quarantined rows are."""
    reasons = sorted(counts["reasons"].items(), key=lambda item: -item[1])[:3]
    listed = ", ".join(f"{reason} {count}" for reason, count in reasons) or "none recorded"
    return (
        f"validate: {name}: {counts['valid']}/{counts['total']} rows valid "
        f"({counts['valid_fraction']:.1%} < data.validation.min_valid_fraction "
        f"{counts['min_valid_fraction']:.0%}); top reasons: {listed}; quarantined rows in "
        f"data/validated/{name}/quarantine.jsonl"
    )


@stage_app.command("sft")
def stage_sft(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Supervised fine-tuning of the base model on the SFT set (completion-only loss)."""
    _launch_if_asked(params_path, "sft")
    from rlhf_core.stages.common import StageContext
    from rlhf_core.stages.sft import run_sft

    _run_training_stage(params_path, lambda p: run_sft(p.sft, StageContext.from_params(p)), "sft")


@stage_app.command("reward")
def stage_reward(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Reward model from the SFT model: Bradley–Terry on pairs, Plackett–Luce on rankings."""
    _launch_if_asked(params_path, "reward")
    from rlhf_core.stages.common import StageContext
    from rlhf_core.stages.reward import run_reward

    _run_training_stage(
        params_path, lambda p: run_reward(p.reward, StageContext.from_params(p)), "reward"
    )


@stage_app.command("dpo")
def stage_dpo(params_path: ParamsOption = Path("params.yaml")) -> None:
    """DPO (or IPO, hinge, conservative DPO, SimPO) from the SFT model on preference pairs."""
    _launch_if_asked(params_path, "dpo")
    from rlhf_core.stages.common import StageContext
    from rlhf_core.stages.dpo import run_dpo

    _run_training_stage(
        params_path, lambda p: run_dpo(p.policy.dpo, StageContext.from_params(p)), "dpo"
    )


@stage_app.command("ppo")
def stage_ppo(params_path: ParamsOption = Path("params.yaml")) -> None:
    """PPO (or GRPO/RLOO) against the reward model with a KL penalty to the SFT model."""
    _launch_if_asked(params_path, "ppo")
    from rlhf_core.stages.common import StageContext
    from rlhf_core.stages.ppo import run_ppo

    _run_training_stage(
        params_path, lambda p: run_ppo(p.policy.ppo, StageContext.from_params(p)), "ppo"
    )


@stage_app.command("evaluate")
def stage_evaluate(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Compare SFT, each aligned policy and best-of-n on held-out prompts."""
    from rlhf_core.stages.common import StageContext
    from rlhf_core.stages.evaluate import run_evaluate

    _run_training_stage(
        params_path,
        lambda p: run_evaluate(
            p.evaluate, StageContext.from_params(p), algorithms=p.policy.algorithms
        ),
        "evaluate",
    )


def _launch_if_asked(params_path: Path, stage: str) -> None:
    """With `launch` settings for more than one process (or an accelerate config), run this
    training stage under `accelerate launch` (`stage_launch`) and exit with its code; in a
    launched process, or with one process, return and run the stage here."""
    from rlhf_core.orchestration.stage_launch import is_launched, run_launched

    if is_launched():
        return
    launch = load_params_or_exit(params_path).launch
    if not launch.launches:
        return
    try:
        code = run_launched(stage, params_path, launch)
    except FileNotFoundError as error:
        fail(str(error))
    raise typer.Exit(code=code)


def _run_training_stage(params_path: Path, stage_function, stage: str) -> None:
    """Run a stage and print its metrics; of a launched stage's processes, only the main one
    gets this far (the others end with FollowerFinished once they have trained)."""
    from rlhf_core.stages.training_stage import FollowerFinished

    try:
        metrics = _run_stage(stage_function, params_path, stage)
    except FollowerFinished:
        return
    typer.echo(json.dumps(metrics, indent=2, default=str))


def _run_stage(stage_function, params_path: Path, stage: str):
    """Run a stage function; its timing split goes to artifacts/timings/<stage>.json."""
    from rlhf_core.files import CannotWriteError
    from rlhf_core.paths import ProjectPaths
    from rlhf_core.stages.preflight import PreflightError
    from rlhf_core.tracking.check import TrackingStoreError, check_tracking_store
    from rlhf_core.tracking.timing import record_stage_timing
    from rlhf_core.training.divergence import TrainingDivergedError

    params_obj = load_params_or_exit(params_path)
    timings_dir = ProjectPaths(params_path.parent).timings_dir
    try:  # a store that does not answer: one line now, not minutes of retries mid-stage
        check_tracking_store(params_path.parent)
    except TrackingStoreError as error:
        fail(str(error))
    try:
        result, _ = record_stage_timing(stage, timings_dir, lambda: stage_function(params_obj))
    except (
        FileNotFoundError,
        ValueError,
        TrainingDivergedError,
        CannotWriteError,  # a full disk or unwritable folder at a write: what and where
        PreflightError,  # the same found before training
    ) as error:
        fail(str(error))
    return result
