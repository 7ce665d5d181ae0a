"""Run the reward, DPO and SFT stage functions, in that order, in one launched program.

`accelerate launch --multi_gpu --num_processes 2 tests/stage_process_worker.py PARAMS` runs
the stages as `rlhf stage <name>` runs them in each launched process (one launch instead of
three saves two interpreter start-ups per process in the tests); the other processes end each
stage with FollowerFinished, as the command does. Run from the project folder.
"""

import sys
from pathlib import Path

from rlhf_core.config import load_params
from rlhf_core.stages.common import StageContext
from rlhf_core.stages.dpo import run_dpo
from rlhf_core.stages.reward import run_reward
from rlhf_core.stages.sft import run_sft
from rlhf_core.stages.training_stage import FollowerFinished


def main(params_path: str) -> None:
    params = load_params(Path(params_path))
    context = StageContext(params.data, params.seed, Path("."), False, params.compute)
    for run in (
        lambda: run_reward(params.reward, context),
        lambda: run_dpo(params.policy.dpo, context),
        lambda: run_sft(params.sft, context),
    ):
        try:
            run()
        except FollowerFinished:
            continue


if __name__ == "__main__":
    main(sys.argv[1])
