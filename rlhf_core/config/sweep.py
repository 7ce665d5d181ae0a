"""The reward–KL frontier sweep: the `sweep` section of params.yaml (`rlhf sweep` runs it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf_core.config.training import is_int, is_number


def _positive_numbers(key: str, values: object, *, allow_empty: bool) -> tuple[float, ...]:
    """`values` as a tuple of distinct finite numbers > 0, or one error line naming `key`."""
    if isinstance(values, str) or not isinstance(values, list | tuple):
        raise ValueError(f"sweep.{key} must be a list of numbers > 0, got {values!r}.")
    if not all(is_number(value) and math.isfinite(value) and value > 0 for value in values):
        raise ValueError(f"sweep.{key} must hold only finite numbers > 0, got {list(values)!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"sweep.{key} lists a value twice: {list(values)!r}.")
    if not values and not allow_empty:
        raise ValueError(f"sweep.{key} must not be empty.")
    return tuple(values)


@dataclass(frozen=True)
class SweepSettings:
    """The grid of `rlhf sweep`: one DVC experiment per DPO β and per PPO KL target.

    Every point trains one policy from the shared SFT and reward models (DVC reuses them) and
    is evaluated by the `evaluate` stage on the same held-out prompts with the same sampling
    and seed, so the points differ only in the knob swept.

    Attributes:
        dpo_betas: DPO's β (`policy.dpo.beta`), one point each. β is DPO's KL weight: a small
            β lets the policy move far from SFT, a large one keeps it close (Rafailov et al.
            2023, §4). [] sweeps no DPO points.
        ppo_target_kls: PPO's KL target in nats (`policy.ppo.train.target_kl`, with
            `adaptive_kl` switched on), one point each. The adaptive controller (Ziegler et
            al. 2019) steers β towards the KL asked for, so the knob is on the frontier's own
            axis; `init_kl_coef` only sets where β starts. [] sweeps no PPO points.
        best_of_n: the best-of-n baselines drawn once, with the first point (1 is SFT
            itself, at KL 0; the others go to `evaluate.best_of_n`). [] for none.
        eval_prompts: the first N held-out prompts every point is evaluated on
            (`evaluate.max_prompts`); None keeps the `evaluate` section's value.
        queue: True runs the points through DVC's queue (`dvc exp run --queue`, then
            `dvc queue start`); False runs them one after another with `dvc exp run --temp`.
        jobs: experiments run at once from the queue (1 keeps the cores for one run).
    """

    dpo_betas: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5)
    ppo_target_kls: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    best_of_n: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    eval_prompts: int | None = None
    queue: bool = True
    jobs: int = 1

    def __post_init__(self) -> None:
        for key in ("dpo_betas", "ppo_target_kls"):
            values = _positive_numbers(key, getattr(self, key), allow_empty=True)
            object.__setattr__(self, key, tuple(float(value) for value in values))
        if not self.dpo_betas and not self.ppo_target_kls:
            raise ValueError(
                "sweep.dpo_betas and sweep.ppo_target_kls are both empty; list at least one "
                "DPO β or PPO KL target to sweep."
            )
        best_of_n = self.best_of_n
        if isinstance(best_of_n, str) or not isinstance(best_of_n, list | tuple):
            raise ValueError(f"sweep.best_of_n must be a list of integers >= 1, got {best_of_n!r}.")
        if not all(is_int(n) and n >= 1 for n in best_of_n) or len(set(best_of_n)) != len(
            best_of_n
        ):
            raise ValueError(
                f"sweep.best_of_n must hold distinct integers >= 1, got {list(best_of_n)!r}."
            )
        object.__setattr__(self, "best_of_n", tuple(best_of_n))
        if self.eval_prompts is not None and not (
            is_int(self.eval_prompts) and self.eval_prompts >= 1
        ):
            raise ValueError(
                f"sweep.eval_prompts must be an integer >= 1 or null (the evaluate section's "
                f"max_prompts), got {self.eval_prompts!r}."
            )
        if not isinstance(self.queue, bool):
            raise ValueError(f"sweep.queue must be true or false, got {self.queue!r}.")
        if not (is_int(self.jobs) and self.jobs >= 1):
            raise ValueError(f"sweep.jobs must be an integer >= 1, got {self.jobs!r}.")
