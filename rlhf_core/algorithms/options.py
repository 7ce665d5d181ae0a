"""Names of the algorithm variants this package implements, importable without torch.

`rlhf_core.config.training` validates params.yaml against these, and reading params (the
CLI, the Prefect flows) must not import torch, so the names live here rather than beside the
torch code that implements them.
"""

from __future__ import annotations

# `preference.dpo_loss(loss_type=...)`: DPO (sigmoid), IPO, SLiC-HF (hinge).
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")

# Every preference-optimisation loss: the DPO family plus `preference.simpo_loss`.
LOSS_TYPES = (*DPO_LOSS_TYPES, "simpo")

# Loss types whose paper scores sequences by their per-token mean log-probability.
LENGTH_NORMALISED_LOSS_TYPES = ("ipo", "simpo")

# `ppo.kl_penalty(kind=...)`: Schulman's k1, k2, k3 estimators and |log ratio|.
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")

# `ppo.group_advantages(kind=...)`: group-mean baseline (GRPO) or leave-one-out (RLOO).
GROUP_ADVANTAGE_KINDS = ("grpo", "rloo")

# Where PPO's advantages come from: `ppo.compute_gae` with a critic, or a group baseline.
ADVANTAGE_ESTIMATORS = ("gae", *GROUP_ADVANTAGE_KINDS)

# `ensemble.conservative_reward(mode=...)`: how a reward-model ensemble's scores become one.
REWARD_AGGREGATES = ("mean", "mean_minus_std", "min")
