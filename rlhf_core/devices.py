"""The device and precision the stages run on, resolved from `compute` on this machine."""

from __future__ import annotations

import logging
import os

import torch

from rlhf_core.config.compute import ComputeSettings

log = logging.getLogger(__name__)


def resolve_device(settings: ComputeSettings, cuda_available: bool | None = None) -> torch.device:
    """`compute.device` on this machine: auto is cuda when a GPU is visible, else cpu; cuda
    without a GPU is a ValueError saying so. In a launched process (LOCAL_RANK set) cuda
    means that process's GPU, cuda:LOCAL_RANK."""
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    device = torch.device(
        ("cuda" if available else "cpu") if settings.device == "auto" else settings.device
    )
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # a launched process's GPU
    if settings.device == "auto":
        return device
    if device.type == "cuda" and not available:
        raise ValueError(
            f"compute.device is {settings.device!r} but torch sees no CUDA device here; set "
            "compute.device to auto or cpu, or install a CUDA build of torch."
        )
    return device


def resolve_precision(
    settings: ComputeSettings, device: torch.device, bf16_supported: bool | None = None
) -> str:
    """`compute.precision` on `device`: auto is bf16 on a GPU with bf16 support, else fp32.
    bf16 or fp16 asked for on a CPU is kept, with a warning (slow without bf16 units)."""
    if settings.precision == "auto":
        if device.type != "cuda":
            return "fp32"
        supported = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        return "bf16" if supported else "fp32"
    if device.type == "cpu" and settings.precision != "fp32":
        log.warning(
            "compute.precision %s on the CPU: autocast there is usually slower than fp32 "
            "unless the CPU has bf16 matrix units",
            settings.precision,
        )
    return settings.precision
