"""Crash harness: kill each training stage at random points; the resumed result must equal the
uninterrupted one.

    python -m benchmarks.crash_harness --stages sft reward dpo ppo --kills 5 --seed 0

For each stage, on a tiny prepared project (demo data, a nano model):
1. one uninterrupted run, whose training time (from the call of the training loop to its
   return) sets where kills are drawn;
2. then, until `--kills` kills have landed mid-training (at most `--max-attempts` tries): a
   fresh copy of the project, the stage started in a child process and, once it has started
   training (startup varies by seconds on a busy machine), SIGKILLed after a time drawn
   uniformly within that training time; restarted until it completes (it resumes from its
   newest whole checkpoint), and its final weights compared with the uninterrupted run's,
   tensor by tensor, bit for bit.

A kill "landed mid-training" when the child had entered the training loop and not left it
(markers the child writes around the loop). Children are forked from this process after the
heavy imports, so a run costs its training, not a Python start; torch runs one thread, as in
the tests. Prints a table; `--json` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("sft", "reward", "dpo", "ppo")
# A small demo project: 64 SFT examples, 48 preference prompts, 16 PPO prompts, a nano model.
PROJECT_PARAMS = {
    "seed": 0,
    "model": {"base": "demo", "tiny_config": "nano", "tokenizer_vocab_size": 400, "seed": 0},
    "data": {"eval_fraction": 0.2},
    "demo": {
        "seed": 0,
        "n_sft": 64,
        "n_preference_prompts": 48,
        "n_ranked": 16,
        "ranking_k": 3,
        "n_ppo_prompts": 16,
        "n_eval_prompts": 8,
        "n_reward_eval_pairs": 40,
    },
}
# Enough optimizer steps and checkpoints (every step) that a kill falls between two of them.
TRAIN = dict(learning_rate=1e-2, warmup_steps=1, batch_size=8, eval_every=3, checkpoint_every=1)
# What a stage imports on its way (most of it inside functions), loaded once in the parent.
WARM_IMPORTS = (
    "accelerate",
    "mlflow",
    "transformers",
    "rlhf_core.models.heads",
    "rlhf_core.models.loading",
    "rlhf_core.stages.dpo",
    "rlhf_core.stages.ppo",
    "rlhf_core.stages.prepare",
    "rlhf_core.stages.reward",
    "rlhf_core.stages.sft",
    "rlhf_core.stages.validate",
    "rlhf_core.tracking.runs",
    "rlhf_core.training.loop",
    "rlhf_core.training.ppo_trainer",
    "rlhf_core.training.rollout",
    "rlhf_core.evaluation.report",
)
RESTARTS = 3  # a killed run is restarted at most this often (each restart runs to the end)


@dataclass
class Trial:
    """One kill: when, whether it landed mid-training, and how the resumed run compares."""

    kill_after_s: float  # after the child entered the training loop
    landed: bool  # the child was inside the training loop when killed
    restarts: int = 0
    resumed_from: int | None = None  # the step the completing run resumed from (0: none)
    completed: bool = False
    equal: bool = False
    max_abs_difference: float | None = None
    differing_tensors: list[str] = field(default_factory=list)


@dataclass
class StageResult:
    """The uninterrupted run and every kill trial of one stage."""

    stage: str
    uninterrupted_s: float
    training_s: float  # of the uninterrupted run: kills are drawn in [0, training_s)
    trials: list[Trial]

    @property
    def landed(self) -> int:
        return sum(trial.landed for trial in self.trials)

    @property
    def survived(self) -> int:
        """Kills that landed mid-training after which the resumed run equals the reference."""
        return sum(trial.landed and trial.completed and trial.equal for trial in self.trials)

    @property
    def all_equal(self) -> bool:
        return all(trial.completed and trial.equal for trial in self.trials)


# --------------------------------------------------------------------------------------------
# The project and the stages (run in child processes)


def stage_settings(stage: str) -> Any:
    """The stage's section with `TRAIN`: a few seconds of training on the nano model."""
    from rlhf_core.config.reward import RewardSettings
    from rlhf_core.config.stages import DPOSettings, PPOSettings, SFTSettings
    from rlhf_core.config.training import PPOTrainSettings, TrainSettings

    if stage == "sft":
        return SFTSettings(train=TrainSettings(**TRAIN, epochs=1.5), num_samples=0)
    if stage == "reward":
        return RewardSettings(train=TrainSettings(**TRAIN, epochs=1.5))
    if stage == "dpo":
        return DPOSettings(train=TrainSettings(**TRAIN, epochs=1.5))
    if stage == "ppo":
        ppo = dict(
            iterations=6,
            rollout_batch_size=8,
            max_new_tokens=6,
            minibatch_size=4,
            ppo_epochs=1,
            learning_rate=1e-2,
            warmup_steps=0,
            eval_every=3,
            checkpoint_every=1,
        )
        return PPOSettings(train=PPOTrainSettings(**ppo), max_eval_prompts=4)
    raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")


def output_dir(root: Path, stage: str) -> Path:
    """Where the stage writes its final model."""
    from rlhf_core.paths import ProjectPaths

    paths = ProjectPaths(root)
    return {
        "sft": paths.sft_model_dir,
        "reward": paths.reward_model_dir,
        "dpo": paths.policy_dir("dpo"),
        "ppo": paths.policy_dir("ppo"),
    }[stage]


def build_project(root: Path) -> None:
    """The prepared and validated demo project, with untrained stand-ins for the SFT and reward
    models (each stage is run alone, from the same inputs every time)."""
    from rlhf_core.config import parse_params
    from rlhf_core.models.heads import RewardModel
    from rlhf_core.models.loading import load_causal_lm, save_model
    from rlhf_core.paths import ProjectPaths
    from rlhf_core.stages.prepare import run_prepare
    from rlhf_core.stages.validate import run_validate

    params = parse_params(PROJECT_PARAMS)
    run_prepare(params, root)
    run_validate(params, root)
    paths = ProjectPaths(root)
    model, tokenizer = load_causal_lm(str(paths.base_model_dir))
    save_model(model, tokenizer, paths.sft_model_dir)
    RewardModel.from_causal_lm(model, seed=0).save_pretrained(
        paths.reward_model_dir, tokenizer=tokenizer
    )


def _markers(root: Path) -> Path:
    return root / ".crash_harness"


def run_stage(root: Path, stage: str) -> None:
    """Run `stage` in `root` as `rlhf stage <stage>` would, with markers around its training
    loop: `started` when the loop is called, `trained` when it returns (time.time() each)."""
    import rlhf_core.stages.training_stage as training_stage
    import rlhf_core.training.ppo_trainer as ppo_trainer
    from rlhf_core.config import parse_params
    from rlhf_core.stages.common import StageContext

    markers = _markers(root)
    markers.mkdir(exist_ok=True)

    def marked(loop):
        def wrapper(*args, **kwargs):
            (markers / "started").write_text(repr(time.time()))
            result = loop(*args, **kwargs)
            (markers / "trained").write_text(repr(time.time()))
            return result

        return wrapper

    training_stage.train = marked(training_stage.train)
    ppo_trainer.train_ppo = marked(ppo_trainer.train_ppo)  # the PPO stage imports it per call
    runner = {
        "sft": "rlhf_core.stages.sft:run_sft",
        "reward": "rlhf_core.stages.reward:run_reward",
        "dpo": "rlhf_core.stages.dpo:run_dpo",
        "ppo": "rlhf_core.stages.ppo:run_ppo",
    }[stage]
    module_name, function_name = runner.split(":")
    function = getattr(__import__(module_name, fromlist=[function_name]), function_name)
    params = parse_params(PROJECT_PARAMS)
    function(stage_settings(stage), StageContext(params.data, 0, root, show_progress=False))


def _child(target, root: Path, *args) -> None:
    """Body of a forked child: one torch thread, the project's own MLflow store, its output
    (progress bars, logs, a traceback) in <root>/.crash_harness/output.log."""
    import torch

    torch.set_num_threads(1)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    _markers(root).mkdir(parents=True, exist_ok=True)
    log = os.open(_markers(root) / "output.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    target(root, *args)


def _start(target, root: Path, *args) -> multiprocessing.Process:
    context = multiprocessing.get_context("fork")
    process = context.Process(target=_child, args=(target, root, *args))
    process.start()
    return process


def _run_to_end(target, root: Path, *args) -> float:
    """Run `target(root, *args)` in a child to its end; its wall time. A failure is an error."""
    started = time.monotonic()
    process = _start(target, root, *args)
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(
            f"{target.__name__} in {root} exited with status {process.exitcode}; see "
            f"{_markers(root) / 'output.log'}"
        )
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------
# Comparing the final weights


def compare_weights(reference: Path, resumed: Path) -> tuple[bool, float, list[str]]:
    """(bit-identical, max |difference|, differing tensor names) over every tensor of every
    *.safetensors file under the two model folders (adapters and heads included)."""
    import torch
    from safetensors.torch import load_file

    differing, largest = [], 0.0
    reference_files = sorted(p.relative_to(reference) for p in reference.rglob("*.safetensors"))
    resumed_files = sorted(p.relative_to(resumed) for p in resumed.rglob("*.safetensors"))
    if reference_files != resumed_files or not reference_files:
        return False, float("inf"), [f"files: {reference_files} vs {resumed_files}"]
    for name in reference_files:
        expected, found = load_file(reference / name), load_file(resumed / name)
        if expected.keys() != found.keys():
            differing.append(f"{name}: tensor names differ")
            largest = float("inf")
            continue
        for key, tensor in expected.items():
            if not torch.equal(tensor, found[key]):
                differing.append(f"{name}:{key}")
                if tensor.shape == found[key].shape:
                    difference = (tensor.double() - found[key].double()).abs().max().item()
                else:
                    difference = float("inf")
                largest = max(largest, difference)
    return not differing, largest, differing


# --------------------------------------------------------------------------------------------
# The harness


def _training_seconds(root: Path) -> float:
    markers = _markers(root)
    return float((markers / "trained").read_text()) - float((markers / "started").read_text())


def kill_trial(
    stage: str, template: Path, trial_root: Path, kill_after_s: float, reference: Path
) -> Trial:
    """One trial: run, SIGKILL `kill_after_s` after it entered the training loop, restart to
    the end, compare the weights with `reference`."""
    shutil.copytree(template, trial_root, symlinks=True)
    markers = _markers(trial_root)
    process = _start(run_stage, trial_root, stage)
    while process.is_alive() and not (markers / "started").exists():
        time.sleep(0.02)
    process.join(timeout=kill_after_s)
    landed = False
    if process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        landed = (markers / "started").exists() and not (markers / "trained").exists()
    trial = Trial(kill_after_s=round(kill_after_s, 3), landed=landed)
    for _ in range(RESTARTS):
        if trial.completed:
            break
        for marker in ("started", "trained"):
            (markers / marker).unlink(missing_ok=True)
        process = _start(run_stage, trial_root, stage)
        process.join()
        trial.restarts += 1
        trial.completed = process.exitcode == 0
    if trial.completed:
        equal, difference, differing = compare_weights(reference, output_dir(trial_root, stage))
        trial.equal, trial.max_abs_difference = equal, difference
        trial.differing_tensors = differing[:5]
        metrics = json.loads((trial_root / "artifacts" / "metrics" / f"{stage}.json").read_text())
        trial.resumed_from = metrics.get("resumed_from")
    return trial


def run_harness(
    stages: list[str], kills: int, seed: int, workdir: Path, max_attempts: int | None = None
) -> list[StageResult]:
    """Every stage: an uninterrupted run, then kill trials until `kills` landed mid-training
    (at most `max_attempts`, default 2 × kills). Returns the figures of each stage."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    template = workdir / "template"
    if not (template / "artifacts" / "reward").is_dir():
        shutil.rmtree(template, ignore_errors=True)
        _run_to_end(build_project, template)
    results = []
    for stage in stages:
        stage_settings(stage)  # an unknown stage fails here, before any run
        reference_root = workdir / f"{stage}-uninterrupted"
        shutil.rmtree(reference_root, ignore_errors=True)
        shutil.copytree(template, reference_root, symlinks=True)
        seconds = _run_to_end(run_stage, reference_root, stage)
        training = _training_seconds(reference_root)
        reference = output_dir(reference_root, stage)
        trials: list[Trial] = []
        for attempt in range(max_attempts or 2 * kills):
            if sum(trial.landed for trial in trials) >= kills:
                break
            trial_root = workdir / f"{stage}-kill-{attempt}"
            shutil.rmtree(trial_root, ignore_errors=True)
            kill_after = rng.uniform(0, training)
            trials.append(kill_trial(stage, template, trial_root, kill_after, reference))
            if trials[-1].completed:  # a failed one stays, with its output.log
                shutil.rmtree(trial_root)
        results.append(StageResult(stage, round(seconds, 2), round(training, 3), trials))
    return results


def table(results: list[StageResult]) -> str:
    """stage | kills attempted | landed mid-training | resumed == uninterrupted."""
    lines = [
        "stage   | kills attempted | landed mid-training | resumed == uninterrupted | run (s)",
        "--------|-----------------|---------------------|--------------------------|--------",
    ]
    for result in results:
        equal = sum(trial.completed and trial.equal for trial in result.trials)
        lines.append(
            f"{result.stage:<7} | {len(result.trials):>15} | {result.landed:>19} | "
            f"{f'{equal}/{len(result.trials)}':>24} | {result.uninterrupted_s:>6.1f}"
        )
    return "\n".join(lines)


def to_json(results: list[StageResult], seconds: float) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 1),
        "stages": {
            result.stage: {
                "uninterrupted_s": result.uninterrupted_s,
                "training_s": result.training_s,
                "kills_attempted": len(result.trials),
                "kills_landed": result.landed,
                "kills_survived": result.survived,
                "all_equal": result.all_equal,
                "trials": [asdict(trial) for trial in result.trials],
            }
            for result in results
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--kills", type=int, default=5, help="kills to land mid-training")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--max-attempts", type=int, default=None, help="default 2 × kills")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/crash_harness"))
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    import importlib

    import torch

    for module in WARM_IMPORTS:  # before the first fork, so each child starts warm
        importlib.import_module(module)
    torch.set_num_threads(1)
    started = time.monotonic()
    results = run_harness(args.stages, args.kills, args.seed, args.workdir, args.max_attempts)
    seconds = time.monotonic() - started
    print(table(results))
    print(f"total {seconds:.1f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(results, seconds), indent=2) + "\n")
    passed = all(r.all_equal and r.landed >= args.kills for r in results)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
