"""Run a training stage on several processes: `rlhf stage <name>` under `accelerate launch`.

dvc.yaml's command stays `rlhf stage sft`; when `launch.num_processes` > 1 (or an accelerate
`launch.config_file` is set) the command re-executes itself as

    python -m accelerate.commands.launch [--config_file F | --multi_gpu] --num_processes N \\
        --num_machines 1 --main_process_ip 127.0.0.1 --main_process_port P \\
        -m rlhf_core.app.cli stage sft --params params.yaml

and exits with its code. The launched processes see `RLHF_LAUNCHED` (or torchrun's
`WORLD_SIZE`) and run the stage itself; only the main one logs and writes outputs. Without a
GPU, accelerate's multi-GPU launcher starts CPU processes, which join over gloo because the
stage builds its Accelerator with `cpu=True` (`training_stage.stage_accelerator`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from rlhf_core.config.launch import LaunchSettings

LAUNCHED_ENV = "RLHF_LAUNCHED"
# The warm stage server's socket: a launched process runs its stage itself.
_STAGE_SERVER_ENV = "RLHF_STAGE_SERVER"


def is_launched(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is one of a launched stage's (ours, or a user's own torchrun)."""
    return LAUNCHED_ENV in environ or int(environ.get("WORLD_SIZE", "1") or 1) > 1


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def config_path(launch: LaunchSettings, project_root: Path) -> Path | None:
    """`launch.config_file` resolved against the project folder; a missing file is an error."""
    if launch.config_file is None:
        return None
    path = Path(launch.config_file)
    path = path if path.is_absolute() else project_root / path
    if not path.is_file():
        raise FileNotFoundError(
            f"launch.config_file {launch.config_file}: no such file (looked at {path}); point "
            "it at an accelerate config such as infra/accelerate/ddp.yaml, or set it to null."
        )
    return path


def launch_argv(
    stage: str, params_path: Path, launch: LaunchSettings, port: int | None = None
) -> list[str]:
    """The `accelerate launch` command line of `rlhf stage <stage>` (module docstring)."""
    params_path = params_path.resolve()
    argv = [sys.executable, "-m", "accelerate.commands.launch"]
    config = config_path(launch, params_path.parent)
    if config is not None:
        argv += ["--config_file", str(config)]
    else:
        argv += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    argv += [
        "--num_processes", str(launch.num_processes),
        "--num_machines", "1",
        "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(port or launch.main_process_port or free_port()),
        "-m", "rlhf_core.app.cli", "stage", stage, "--params", str(params_path),
    ]  # fmt: skip
    return argv


def launch_env(launch: LaunchSettings, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The launched processes' environment: marked as launched, out of the warm stage server,
    and (unless OMP_NUM_THREADS is set) the CPU cores shared out between the processes."""
    env = {key: value for key, value in environ.items() if key != _STAGE_SERVER_ENV}
    env[LAUNCHED_ENV] = "1"
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // launch.num_processes))
    return env


def run_launched(stage: str, params_path: Path, launch: LaunchSettings) -> int:
    """Run the stage under `accelerate launch`; its exit code. SIGTERM and SIGINT reach the
    launcher, which stops every process it started."""
    process = subprocess.Popen(launch_argv(stage, params_path, launch), env=launch_env(launch))

    def forward(signum, _frame):
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
