"""Argument checks shared by the log-probability and preference modules."""

from __future__ import annotations

from torch import Tensor


def require_same_shape(**tensors: Tensor) -> None:
    """Raise a ValueError naming the first tensor whose shape differs from the first one."""
    (first_name, first), *others = tensors.items()
    for name, tensor in others:
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {first_name} has shape "
                f"{tuple(first.shape)}; they must match (one value per example)."
            )
