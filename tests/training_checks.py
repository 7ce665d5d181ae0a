"""Checks the training-objective tests share: one captured optimizer step, and the comparison
of a whole batch with its accumulated micro-batches."""

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rlhf_core.training.loop import train


def train_one_step(model, task, settings):
    """Run `train` for one step; return the gradients the optimizer stepped with, by name."""
    names = {id(p): name for name, p in model.named_parameters()}
    gradients = {}

    def capture(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                gradients[names[id(parameter)]] = parameter.grad.detach().clone()

    handle = register_optimizer_step_pre_hook(capture)
    try:
        train(model, task, settings, show_progress=False)
    finally:
        handle.remove()
    return gradients


def assert_same_step(whole, accumulated, whole_grads, accumulated_grads, learning_rate):
    """Equal gradients; equal parameters wherever Adam's first step is well defined.

    Adam's first update is lr · g / (|g| + eps), about lr · sign(g): float noise on a gradient
    that is numerically zero (|g| ~ eps) can flip it, so those elements are not compared (a
    reward model's bias has such a gradient: its losses see only reward differences).
    """
    assert set(whole_grads) == set(accumulated_grads) == {n for n, _ in whole.named_parameters()}
    for name, gradient in whole_grads.items():
        torch.testing.assert_close(accumulated_grads[name], gradient, rtol=1e-4, atol=1e-6)
    for (name, a), b in zip(whole.named_parameters(), accumulated.parameters(), strict=True):
        defined = whole_grads[name].abs() > 1e-5
        torch.testing.assert_close(a[defined], b[defined], rtol=0, atol=1e-3 * learning_rate)
