"""Reward-model ensembles: one conservative reward from k members' scores, and the bootstrap
resample each member trains on.

Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization" (arXiv:2310.02743):
a policy optimised against one learned reward finds the responses that reward overrates;
members trained from other seeds and data disagree most there, so rewarding the ensemble's
worst case, or its mean less its spread, leaves less to exploit and delays the point where the
true (gold) reward peaks. Pure functions of tensors; no models, no I/O.
"""

from __future__ import annotations

import torch

from rlhf_core.algorithms.options import REWARD_AGGREGATES


def ensemble_std(scores: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of each response's k member scores.

    sqrt((1/k) Σ_i (r_i − r̄)²); scores (k, n) -> (n,). Population, not sample (1/(k−1)),
    so that one member has std 0 (the sample std is undefined at k = 1) and every aggregate
    of one member is that member's score.
    """
    _require_members(scores)
    return scores.float().std(dim=0, unbiased=False)


def conservative_reward(scores: torch.Tensor, mode: str, std_coef: float = 1.0) -> torch.Tensor:
    """One reward per response from the k members' scores, (k, n) -> (n,) float32.

    - mean:            r̄ = (1/k) Σ_i r_i
    - mean_minus_std:  r̄ − λ·σ, σ the population std (`ensemble_std`), λ = `std_coef`
    - min:             min_i r_i (Coste et al.'s worst-case optimisation, WCO)

    Coste et al.'s uncertainty-weighted optimisation (UWO) subtracts λ times the variance;
    the std used here is in the reward's own units, so a λ keeps its meaning when the reward
    model's scale changes. With k = 1 every mode returns the member's scores unchanged.
    """
    _require_members(scores)
    if mode not in REWARD_AGGREGATES:
        raise ValueError(
            f"Unknown reward aggregate {mode!r}; use one of {', '.join(REWARD_AGGREGATES)}."
        )
    scores = scores.float()
    if scores.shape[0] == 1:
        return scores[0].clone()
    if mode == "min":
        return scores.min(dim=0).values
    mean = scores.mean(dim=0)
    if mode == "mean":
        return mean
    return mean - std_coef * ensemble_std(scores)


def bootstrap_indices(count: int, seed: int) -> list[int]:
    """`count` indices drawn uniformly with replacement from range(count) (Efron's bootstrap).

    Each member sees as many comparisons as one model would (about 63% of them distinct), so
    it trains for the same number of steps; disjoint splits would leave each of k members
    1/k of the data, which on small preference sets costs more accuracy than it buys
    diversity. Seeded by its own generator: the global RNG is untouched.
    """
    if count < 1:
        raise ValueError(f"A bootstrap resample needs at least one item, got {count}.")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(count, (count,), generator=generator).tolist()


def _require_members(scores: torch.Tensor) -> None:
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(
            f"Expected member scores of shape (members, responses) with at least one member "
            f"but got shape {tuple(scores.shape)}."
        )
