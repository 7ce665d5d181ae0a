"""Learning-rate schedules: linear warmup, then cosine or linear decay to a floor."""

from __future__ import annotations

import math

import torch

from rlhf_core.config.training import SCHEDULES


def lr_multiplier(
    step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine", min_ratio: float = 0.1
) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Warmup: (step + 1) / warmup_steps for step < warmup_steps (Goyal et al. 2017, arXiv:1706.02677).
    Then, with progress p = (step − warmup) / max(1, total − warmup) in [0, 1]:
      cosine:   min_ratio + (1 − min_ratio) · ½ (1 + cos(π p))   (Loshchilov & Hutter 2017,
                arXiv:1608.03983, without restarts)
      linear:   min_ratio + (1 − min_ratio) · (1 − p)
      constant: 1
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_multiplier`; its state is just the step count, so it resumes exactly."""
    lr_multiplier(0, total_steps, warmup_steps, schedule, min_ratio)  # validates the name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps, warmup_steps, schedule, min_ratio),
    )
