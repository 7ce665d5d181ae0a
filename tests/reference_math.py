"""Slow references shared by the algorithm tests: plain loops over a formula, and gradients
against fixed random weights, in float64."""

from __future__ import annotations

import torch

F64 = torch.float64


def log_sum_exp_loop(values) -> torch.Tensor:
    """log Σ exp(v), written out term by term (inputs are moderate, so no max-shift needed)."""
    total = 0.0
    for value in values:
        total = total + torch.exp(value)
    return torch.log(total)


def log_sigmoid_loop(x: torch.Tensor) -> torch.Tensor:
    """log σ(x) = log(1 / (1 + e^(−x))), straight from the definition."""
    return torch.log(1.0 / (1.0 + torch.exp(-x)))


def weighted_grads(fn, inputs, seed=0):
    """Gradients of Σ w · fn(*inputs) for fixed random weights w (so no gradient is trivial)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    (weights * out).sum().backward()
    return [leaf.grad for leaf in leaves]
