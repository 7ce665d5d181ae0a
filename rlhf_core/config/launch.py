"""How the training stages start their processes: the `launch` section of params.yaml."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchSettings:
    """Processes of the sft, reward, dpo and ppo stages.

    Attributes:
        num_processes: 1 (default) runs a stage as a plain process; N > 1 runs it under
            `accelerate launch` with N processes, data-parallel (DDP: gloo on CPUs, NCCL on
            GPUs). Each stage's `train.batch_size` stays the global batch of an optimizer
            step, split over the processes, so N processes reach the update one process makes
            on the same step.
        config_file: an accelerate config file (e.g. infra/accelerate/ddp.yaml); relative
            paths are from the project folder. Setting it launches the stage under accelerate
            even with one process; `num_processes` overrides the file's. FSDP2 and DeepSpeed
            configs are refused for now (the stages save from the main process's weights).
        main_process_port: the rendezvous port of the processes (null: a free port).
    """

    num_processes: int = 1
    config_file: str | None = None
    main_process_port: int | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.num_processes, int)
            or isinstance(self.num_processes, bool)
            or self.num_processes < 1
        ):
            raise ValueError(
                f"launch.num_processes must be a whole number of at least 1, got "
                f"{self.num_processes!r}."
            )
        if self.config_file is not None and (
            not isinstance(self.config_file, str) or not self.config_file.strip()
        ):
            raise ValueError(
                f"launch.config_file must be a path or null, got {self.config_file!r}."
            )
        port = self.main_process_port
        if port is not None and (
            not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535
        ):
            raise ValueError(f"launch.main_process_port must be 1 to 65535 or null, got {port!r}.")

    @property
    def launches(self) -> bool:
        """Whether a stage runs under `accelerate launch` (more than one process, or a config)."""
        return self.num_processes > 1 or self.config_file is not None
