"""Model FLOPs per token, to turn tokens/s into a fraction of the machine's matmul peak.

Counting follows Kaplan et al. 2020 (arXiv:2001.08361, section 2.1) and PaLM (Chowdhery et al.
2022, arXiv:2204.02311, appendix B): a forward pass costs 2 FLOPs per weight of every matrix a
token goes through, and training (forward + backward) 3× that, so 6·N per token for N matmul
weights. Attention adds, per token and layer, QKᵀ and attention·V over the context: 2·2·d·c
forward FLOPs for c attended positions. We count causal attention as computed usefully: a
token at position t attends to t + 1 positions, so over a sequence of length T the mean
context is (T + 1) / 2 (PaLM counts the full T, an upper bound).

With frozen weights (LoRA), the backward pass still multiplies by every matrix to carry the
gradient to the inputs (2 FLOPs per weight) but computes weight gradients only for the
trainable ones (2 per trainable weight): 4·N + 2·N_trainable instead of 6·N.

Embedding lookups, norms, activations and the optimizer are not matmuls and are not counted:
utilisation = counted FLOPs / time / matmul peak is the share of the peak spent on the work
that has to be done.
"""

from __future__ import annotations

from collections.abc import Sequence


def matmul_weights(model, trainable_only: bool = False) -> int:
    """Weights of every `nn.Linear` in `model` (the matrices a token's forward pass
    multiplies); with `trainable_only`, of those that get gradients."""
    from torch import nn

    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            if module.weight.requires_grad or not trainable_only:
                total += module.weight.numel()
    return total


def mean_causal_context(lengths: Sequence[int]) -> float:
    """Mean attended positions per token over sequences of `lengths`: Σ T(T+1)/2 / Σ T."""
    tokens = sum(lengths)
    if tokens == 0:
        raise ValueError("no tokens")
    return sum(length * (length + 1) / 2 for length in lengths) / tokens


def forward_flops_per_token(weights: int, layers: int, hidden: int, context: float) -> float:
    """2·N + 4·L·d·c: matmul weights N, L layers of width d, mean attended context c."""
    return 2.0 * weights + 4.0 * layers * hidden * context


def training_flops_per_token(
    weights: int, layers: int, hidden: int, context: float, trainable: int | None = None
) -> float:
    """Forward + backward: 3 × `forward_flops_per_token` (6·N + 12·L·d·c) when every weight
    trains; 4·N + 2·`trainable` + 12·L·d·c when only `trainable` of the N weights do."""
    if trainable is None:
        trainable = weights
    return 3.0 * forward_flops_per_token(weights, layers, hidden, context) - 2.0 * (
        weights - trainable
    )


def utilisation(flops_per_token: float, tokens_per_s: float, peak_gflops: float) -> float:
    """Achieved FLOP/s over the measured matmul peak."""
    if peak_gflops <= 0:
        raise ValueError("the matmul peak must be positive")
    return flops_per_token * tokens_per_s / (peak_gflops * 1e9)
