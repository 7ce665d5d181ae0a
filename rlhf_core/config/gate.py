"""Thresholds of the quality gate: the `gate` section of params.yaml (`rlhf_core.gate` decides)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class GateSettings:
    """Thresholds of the quality gate.

    Attributes:
        policy_metric: the evaluate metric a policy must raise (default
            "gold_win_rate_vs_sft", the gold judge's win rate over SFT); also the metric that
            ranks the candidates.
        fallback_metric: used instead when `policy_metric` is null, as gold metrics are for data
            without a gold judge (default "rm_win_rate_vs_sft"); None means no fallback.
        min_policy_metric: the least `policy_metric` a policy needs (default 0.6: it beats SFT
            on 60% of held-out prompts).
        max_kl: the largest KL(policy ‖ SFT) in nats a policy may have (default 25.0); a
            policy far from SFT has likely learned to exploit the reward model.
        min_ended_fraction: the least share of a policy's evaluation responses that end with
            EOS within the token limit (default 0.9); a policy that learned not to stop, to
            please a reward model that scores unfinished text high, fails.
        min_reward_accuracy: the least held-out pairwise accuracy of the reward model
            (default 0.6).
        min_sanity_pass_fraction: when set, the least share of the out-of-task sanity prompts
            (`evaluate.sanity_prompts`) a policy must still answer right; a policy evaluated
            without them fails. None (default) skips the check.
        min_win_rate_vs_champion: the least head-to-head win rate of the candidate against the
            current champion (default 0.55, ties counting half).
        candidate_policies: the policies that may become the candidate (default dpo, ppo).
        block_on_overoptimisation: fail a policy whose training stage reports the
            overoptimisation alarm (`overoptimisation/alarm` 1 in artifacts/metrics/ppo.json:
            the reward-model score rose while the gold score fell); default False, the alarm
            only warns. A policy whose stage has no gold judge (alarm off) or no alarm (DPO)
            is not blocked.
        min_human_win_rate: when set, the least head-to-head win rate people gave the
            candidate over the champion in `rlhf label` (ties half, "both bad" left out),
            counted on votes whose sides were trained by exactly the candidate's and the
            champion's runs. Applies once `min_human_votes` such votes exist; with fewer
            the gate says so and decides without it. None (default) never asks.
        min_human_votes: votes on the candidate against the champion before
            `min_human_win_rate` applies (default 20).
    """

    policy_metric: str = "gold_win_rate_vs_sft"
    fallback_metric: str | None = "rm_win_rate_vs_sft"
    min_policy_metric: float = 0.6
    max_kl: float = 25.0
    min_ended_fraction: float = 0.9
    min_reward_accuracy: float = 0.6
    min_sanity_pass_fraction: float | None = None
    min_win_rate_vs_champion: float = 0.55
    candidate_policies: tuple[str, ...] = ("dpo", "ppo")
    block_on_overoptimisation: bool = False
    min_human_win_rate: float | None = None
    min_human_votes: int = 20

    def __post_init__(self) -> None:
        for name in ("min_policy_metric", "max_kl", "min_reward_accuracy", "min_ended_fraction"):
            if not is_finite_number(getattr(self, name)):
                raise ValueError(f"GateSettings.{name} must be a finite number.")
        if not is_finite_number(self.min_win_rate_vs_champion) or not (
            0.0 <= self.min_win_rate_vs_champion <= 1.0
        ):
            raise ValueError("GateSettings.min_win_rate_vs_champion must lie in [0, 1].")
        if self.min_sanity_pass_fraction is not None and not (
            is_finite_number(self.min_sanity_pass_fraction)
            and 0.0 <= self.min_sanity_pass_fraction <= 1.0
        ):
            raise ValueError("GateSettings.min_sanity_pass_fraction must lie in [0, 1] or be null.")
        if self.max_kl < 0:
            raise ValueError("GateSettings.max_kl must be non-negative (KL is never below 0).")
        if not isinstance(self.block_on_overoptimisation, bool):
            raise ValueError("GateSettings.block_on_overoptimisation must be true or false.")
        if self.min_human_win_rate is not None and not (
            is_finite_number(self.min_human_win_rate) and 0.0 <= self.min_human_win_rate <= 1.0
        ):
            raise ValueError("GateSettings.min_human_win_rate must lie in [0, 1] or be null.")
        if (
            not isinstance(self.min_human_votes, int)
            or isinstance(self.min_human_votes, bool)
            or self.min_human_votes < 1
        ):
            raise ValueError("GateSettings.min_human_votes must be a whole number of at least 1.")
        if isinstance(self.candidate_policies, str) or not self.candidate_policies:
            raise ValueError("GateSettings.candidate_policies must be a non-empty tuple of names.")
