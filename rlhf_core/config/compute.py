"""Where the stages compute: the `compute` section of params.yaml (one setting for the device
and one for the precision; `rlhf_core.devices` resolves them on the machine at hand)."""

from __future__ import annotations

import re
from dataclasses import dataclass

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ComputeSettings:
    """The device and the precision of every training and evaluation stage.

    Attributes:
        device: auto (default: the first CUDA GPU when one is visible, else the CPU) | cpu |
            cuda | cuda:N. Asking for cuda on a machine without one is an error, not a
            silent fall back to the CPU.
        precision: auto (default: bf16 autocast on a GPU that supports it, fp32 elsewhere; a
            CPU without fast bf16 units runs bf16 several times slower than fp32) | fp32 |
            bf16 | fp16. The SFT, reward and DPO stages train under accelerate's autocast in
            this precision unless their `train.mixed_precision` names another; PPO and the
            evaluation run fp32 on every device (their log-probabilities and KL estimates
            are compared across models).
    """

    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ValueError(
                f"compute.device must be auto, cpu, cuda or cuda:N, got {self.device!r}."
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"compute.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}."
            )
