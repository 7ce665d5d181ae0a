"""SFT, reward and DPO on two processes (`launch.num_processes: 2`, the real `accelerate
launch`, DDP over gloo) reach what one process reaches with the same global batch; the PPO
stage runs its rollouts and update on two processes (its equivalences are tested in
test_ppo_processes.py) and the main process alone writes its outputs.

The batch sizes leave each epoch a last step of one example, so the second process has an
empty shard there: before the fix it never called backward and the first one waited in the
all-reduce forever (the timeout turns such a hang into a failure).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file
from tiny_models import TINY_PPO_TRAIN

from rlhf_core.config import parse_params
from rlhf_core.orchestration.stage_launch import free_port
from rlhf_core.paths import ProjectPaths
from rlhf_core.stages.common import StageContext, load_split
from rlhf_core.stages.dpo import run_dpo
from rlhf_core.stages.reward import run_reward
from rlhf_core.stages.sft import run_sft
from rlhf_core.tracking.lineage import read_producer_run_id

pytestmark = pytest.mark.slow

# Max |Δ| between a weight trained on 1 and on 2 processes, and between their per-step losses:
# the two differ only in the order float sums are taken (float32 round-off). Measured: weights
# 6e-7 (reward), 4e-7 (DPO), 6e-8 (SFT); losses ≤ 8e-7; a step moves weights by ~1e-2.
WEIGHT_TOLERANCE = 2e-5
LOSS_TOLERANCE = 1e-5
LAUNCH_TIMEOUT_S = 240
TESTS = Path(__file__).parent


def _train(batch_size: int) -> dict:
    return {
        "learning_rate": 0.01,
        "warmup_steps": 0,
        "epochs": 2.0,
        "batch_size": batch_size,
        "micro_batch_size": 4,  # two micro-batches per process: accumulation under no_sync
        "eval_every": 0,
        "checkpoint_every": 0,
        "mixed_precision": "fp32",
    }


def _params(project: Path, tiny_params_dict: dict) -> dict:
    """The tiny project's params with small training runs whose every epoch ends on a step of
    one example (n ≡ 1 mod batch_size)."""
    params = parse_params(tiny_params_dict)
    paths = ProjectPaths(project)
    sft_rows = len(load_split(paths, "sft", params.data)[0])
    pairs = len(load_split(paths, "preference", params.data)[0])
    return {
        **tiny_params_dict,
        "compute": {"device": "cpu", "precision": "fp32"},
        "sft": {"train": _train(sft_rows - 1), "num_samples": 0, "packing": False},
        "reward": {"train": _train(pairs - 1), "use_rankings": False},
        "policy": {
            "dpo": {"train": _train(pairs - 1)},
            # 6 prompts an iteration: 3 per process
            "ppo": {"train": dict(TINY_PPO_TRAIN, rollout_batch_size=6, minibatch_size=3,
                                  iterations=2, eval_every=1)},
        },
    }  # fmt: skip


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _losses(project: Path, stage: str) -> list[float]:
    curves = json.loads((ProjectPaths(project).plots_dir / f"{stage}_curves.json").read_text())
    return [row["loss"] for row in curves]


def test_two_processes_reach_the_one_process_result(
    tiny_project, tmp_path, mlflow_uri, monkeypatch
):
    from tests.conftest import TINY_PARAMS

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    two = Path(shutil.copytree(tiny_project, tmp_path / "two"))
    settings = _params(tiny_project, TINY_PARAMS)
    # PPO launches from the team's DDP config (the other stages' flags are the default's).
    ddp_config = str(Path(__file__).parents[1] / "infra" / "accelerate" / "ddp.yaml")
    launch = {"num_processes": 2, "config_file": ddp_config}
    (two / "params.yaml").write_text(yaml.safe_dump({**settings, "launch": launch}))

    # One process, in this process. DPO and the reward model start from the project's SFT
    # model, so they run before SFT replaces it.
    one_params = parse_params(settings)
    context = StageContext(one_params.data, 0, tiny_project, False, one_params.compute)
    run_reward(one_params.reward, context)
    run_dpo(one_params.policy.dpo, context)
    run_sft(one_params.sft, context)

    # Two processes: the three stages in one launch (each launch starts two interpreters),
    # and PPO through the stage command dvc.yaml runs (it re-executes under accelerate, with
    # infra/accelerate/ddp.yaml; were the two processes not joined, each would train alone
    # and the stage would stop: `stage_accelerator`).
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()),
        str(TESTS / "stage_process_worker.py"), str(two / "params.yaml"),
    ]  # fmt: skip
    done = subprocess.run(
        launch, cwd=two, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ppo = subprocess.run(
        [sys.executable, "-m", "rlhf_core.app.cli", "stage", "ppo",
         "--params", str(two / "params.yaml")],
        cwd=two, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )  # fmt: skip
    assert ppo.returncode == 0, ppo.stderr[-3000:]

    one_paths, two_paths = ProjectPaths(tiny_project), ProjectPaths(two)
    for stage, one_dir, two_dir in (
        ("reward", one_paths.reward_model_dir, two_paths.reward_model_dir),
        ("dpo", one_paths.policy_dir("dpo"), two_paths.policy_dir("dpo")),
        ("sft", one_paths.sft_model_dir, two_paths.sft_model_dir),
    ):
        one_weights, two_weights = _weights(one_dir), _weights(two_dir)
        assert set(one_weights) == set(two_weights)
        worst = max((one_weights[k] - two_weights[k]).abs().max().item() for k in one_weights)
        assert worst <= WEIGHT_TOLERANCE, (stage, worst)
        one_losses, two_losses = _losses(tiny_project, stage), _losses(two, stage)
        assert len(one_losses) == len(two_losses) == 4  # 2 epochs of 2 steps (n-1, then 1)
        assert max(abs(a - b) for a, b in zip(one_losses, two_losses, strict=True)) <= (
            LOSS_TOLERANCE
        ), (stage, one_losses, two_losses)

        # The main process alone logged: one finished run, one value per step and metric.
        two_metrics = json.loads(two_paths.metrics_file(stage).read_text())
        assert two_metrics["steps"] == 4
        run_id = read_producer_run_id(two_dir)
        client = MlflowClient(mlflow_uri)
        assert client.get_run(run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]

    # PPO: one model, one finished run with one value per iteration, the metrics printed once.
    ppo_dir = two_paths.policy_dir("ppo")
    assert (ppo_dir / "model.safetensors").is_file() and (ppo_dir / "value_head.json").is_file()
    run_id = read_producer_run_id(ppo_dir)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "reward/score_mean")] == [1, 2]
    printed = ppo.stdout  # the progress bar, then the metrics, once: from the main process
    assert printed.count("{\n") == 1
    assert json.loads(printed[printed.index("{\n") :]) == pytest.approx(
        json.loads(two_paths.metrics_file("ppo").read_text())
    )
