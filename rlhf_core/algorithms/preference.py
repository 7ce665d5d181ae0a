"""Preference losses: Bradley–Terry and Plackett–Luce for reward models, DPO family and SimPO.

Every function here is a pure function of tensors: trainers compose them and never re-derive
the math. Each loss returns per-example values (reduce with `.mean()` in the trainer) unless
its docstring says otherwise. Sequence log-probabilities come from
`rlhf_core.algorithms.logprobs.sequence_logprobs`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_core.algorithms._checks import require_same_shape
from rlhf_core.algorithms.options import DPO_LOSS_TYPES

# --------------------------------------------------------------------------------------------
# Reward-model losses
# --------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None
) -> Tensor:
    """Bradley–Terry pairwise loss for reward models, per pair.

    L = −log σ(r⁺ − r⁻ − m)

    computed with `logsigmoid` for stability. It is not clamped: a misranked pair (r⁺ < r⁻)
    keeps a gradient of magnitude 1 − σ(r⁺ − r⁻ − m), which approaches 1.

    Bradley & Terry (1952), "Rank analysis of incomplete block designs"; as the reward-model
    loss in Ouyang et al. (2022), InstructGPT, arXiv:2203.02155. The margin m (e.g. from a
    preference-strength rating) follows Touvron et al. (2023), Llama 2, arXiv:2307.09288.

    Args:
        chosen_rewards: (batch,) rewards r⁺ of the preferred responses.
        rejected_rewards: (batch,) rewards r⁻ of the other responses.
        margin: optional m, a float or a tensor shaped like the rewards.

    Returns:
        (batch,) per-pair losses.
    """
    require_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    reward_gap = chosen_rewards - rejected_rewards
    if margin is not None:
        if isinstance(margin, Tensor) and margin.dim() > 0:
            require_same_shape(chosen_rewards=chosen_rewards, margin=margin)
        reward_gap = reward_gap - margin
    return -F.logsigmoid(reward_gap)


def plackett_luce_loss(scores: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Plackett–Luce negative log-likelihood of an observed ranking, per example.

    With scores s₁ … s_L of L responses listed best first,

        L = −Σ_{i=1}^{L−1} [ sᵢ − log Σ_{j=i}^{L} exp(sⱼ) ]

    i.e. the best response is picked from all L, the second from the remaining L − 1, and so
    on. At L = 2 this is exactly the Bradley–Terry loss −log σ(s₁ − s₂).

    Plackett (1975), "The analysis of permutations"; Luce (1959), "Individual choice behavior".
    InstructGPT (Ouyang et al. 2022, arXiv:2203.02155) collects rankings of K = 4..9 responses
    but trains on all C(K, 2) pairwise comparisons (see `pairwise_ranking_loss`); here we use
    the full Plackett–Luce likelihood, as analysed by Zhu, Jordan & Jiao (2023),
    arXiv:2301.11270.

    Args:
        scores: (batch, K) scores in preferred-first order.
        lengths: optional (batch,) integers L in [2, K], the number of real responses per
            example; entries at positions ≥ L are padding and affect neither the loss nor any
            gradient. Defaults to K for every example.

    Returns:
        (batch,) per-example losses.
    """
    valid = _ranking_mask(scores, lengths)  # (batch, K)
    num_responses = valid.sum(-1)  # (batch,)
    positions = torch.arange(scores.shape[1], device=scores.device)
    # A large finite fill (not -inf) keeps logcumsumexp and its gradient free of NaN.
    padded = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    # log Σ_{j ≥ i} exp(s_j) over real responses, by a reversed cumulative logsumexp.
    remaining_logsumexp = padded.flip(-1).logcumsumexp(-1).flip(-1)  # (batch, K)
    is_choice = positions < (num_responses - 1).unsqueeze(-1)  # (batch, K): i < L − 1
    choice_logprobs = (padded - remaining_logsumexp).masked_fill(~is_choice, 0.0)
    return -choice_logprobs.sum(-1)


def pairwise_ranking_loss(scores: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Mean Bradley–Terry loss over all pairs of a ranking, per example (InstructGPT form).

    L = 1 / C(L, 2) · Σ_{i < j ≤ L} −log σ(sᵢ − sⱼ)

    Ouyang et al. (2022), InstructGPT, arXiv:2203.02155, eq. 1: all C(K, 2) comparisons from
    one ranking are kept in one example so the reward model sees each prompt once per epoch.

    Args:
        scores: (batch, K) scores in preferred-first order.
        lengths: optional (batch,) integers L in [2, K]; positions ≥ L are padding and affect
            neither the loss nor any gradient. Defaults to K.

    Returns:
        (batch,) per-example losses.
    """
    valid = _ranking_mask(scores, lengths)  # (batch, K)
    num_responses = valid.sum(-1)  # (batch,)
    num_slots = scores.shape[1]
    better_first = torch.ones(num_slots, num_slots, dtype=torch.bool, device=scores.device)
    better_first = better_first.triu(diagonal=1)  # (K, K): i < j
    is_pair = better_first & valid.unsqueeze(1) & valid.unsqueeze(2)  # (batch, K, K)
    score_gaps = scores.unsqueeze(2) - scores.unsqueeze(1)  # (batch, K, K): s_i − s_j
    pair_losses = (-F.logsigmoid(score_gaps)).masked_fill(~is_pair, 0.0)
    num_pairs = num_responses * (num_responses - 1) // 2
    return pair_losses.sum((1, 2)) / num_pairs


def _ranking_mask(scores: Tensor, lengths: Tensor | None) -> Tensor:
    """(batch, K) bool, True at real responses; validates `scores` and `lengths`."""
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(
            "scores must be a floating-point tensor of shape (batch, K) but has shape "
            f"{tuple(scores.shape)} and dtype {scores.dtype}."
        )
    batch, num_slots = scores.shape
    if lengths is None:
        if num_slots < 2:
            raise ValueError(f"a ranking needs at least 2 responses but scores has K={num_slots}.")
        return torch.ones_like(scores, dtype=torch.bool)
    if lengths.shape != (batch,) or lengths.is_floating_point():
        raise ValueError(
            f"lengths must be an integer tensor of shape ({batch},) but has shape "
            f"{tuple(lengths.shape)} and dtype {lengths.dtype}."
        )
    if batch > 0 and (lengths.min() < 2 or lengths.max() > num_slots):
        raise ValueError(
            f"lengths must lie in [2, {num_slots}] (at least two ranked responses, at most K) "
            f"but range from {int(lengths.min())} to {int(lengths.max())}."
        )
    positions = torch.arange(num_slots, device=scores.device)
    return positions < lengths.to(scores.device).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# Direct preference optimisation
# --------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO-family losses on sequence log-probabilities, per pair.

    With h = (log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻)):

    - "sigmoid": L = −(1 − ε) log σ(β h) − ε log σ(−β h).
      Rafailov et al. (2023), DPO, arXiv:2305.18290; ε > 0 is conservative DPO for noisy
      labels, Mitchell (2023), "A note on DPO with noisy preferences & relationship to IPO".
    - "ipo": L = (h − 1/(2β))². Azar et al. (2023), IPO, arXiv:2310.12036. The paper uses
      per-token average log-probabilities; the caller chooses sum or mean through
      `sequence_logprobs(..., average=...)`.
    - "hinge": L = max(0, 1 − β h). SLiC-HF, Zhao et al. (2023), arXiv:2305.10425.

    Implicit rewards r⁺ = β (log π(y⁺) − log π_ref(y⁺)) and r⁻ = β (log π(y⁻) − log π_ref(y⁻))
    are returned detached, for logging and reward accuracy.

    Args:
        policy_chosen_logps: (batch,) log π(y⁺ | x), e.g. from `sequence_logprobs`.
        policy_rejected_logps: (batch,) log π(y⁻ | x).
        ref_chosen_logps: (batch,) log π_ref(y⁺ | x).
        ref_rejected_logps: (batch,) log π_ref(y⁻ | x).
        beta: β > 0, the strength of the implicit KL penalty (IPO: the regularisation τ).
        loss_type: one of "sigmoid", "ipo", "hinge".
        label_smoothing: ε in [0, 0.5), the assumed label-flip rate; "sigmoid" only.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (batch,).
    """
    require_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES} but is {loss_type!r}.")
    _require_positive_beta(beta)
    _require_valid_label_smoothing(label_smoothing)
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(
            f"label_smoothing={label_smoothing} only applies to loss_type='sigmoid'; set it "
            f"to 0 for loss_type={loss_type!r}."
        )
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (batch,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (batch,)
    logratio_gap = chosen_logratios - rejected_logratios  # h, (batch,)
    if loss_type == "sigmoid":
        losses = _smoothed_logistic_loss(beta * logratio_gap, label_smoothing)
    elif loss_type == "ipo":
        losses = (logratio_gap - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = F.relu(1.0 - beta * logratio_gap)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO: reference-free, length-normalised preference loss, per pair.

    Rewards are length-normalised log-probabilities r = β / |y| · log π(y | x), and

        L = −(1 − ε) log σ(r⁺ − r⁻ − γ) − ε log σ(−(r⁺ − r⁻ − γ)),  γ = gamma_beta_ratio · β.

    With ε = 0 (the paper's setting) this is −log σ(r⁺ − r⁻ − γ). Meng, Xia & Chen (2024),
    SimPO, arXiv:2405.14734.

    Args:
        policy_chosen_logps: (batch,) SUMMED log π(y⁺ | x), i.e. `sequence_logprobs(...)` with
            `average=False`; the division by length happens here.
        policy_rejected_logps: (batch,) summed log π(y⁻ | x).
        chosen_lengths: (batch,) number of counted tokens |y⁺| (> 0).
        rejected_lengths: (batch,) number of counted tokens |y⁻| (> 0).
        beta: β > 0, the reward scale.
        gamma_beta_ratio: γ / β, the target reward margin relative to β.
        label_smoothing: ε in [0, 0.5), as in conservative DPO.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (batch,); the rewards are detached.
    """
    require_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    _require_positive_beta(beta)
    _require_valid_label_smoothing(label_smoothing)
    if chosen_lengths.numel() > 0 and (
        (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any()
    ):
        raise ValueError(
            "chosen_lengths and rejected_lengths must be positive token counts; drop pairs "
            "with an empty completion."
        )
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths  # (batch,)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths  # (batch,)
    gamma = gamma_beta_ratio * beta
    losses = _smoothed_logistic_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


class PairLoss(NamedTuple):
    """Per-pair results of a sequence-level preference loss, each (pairs,).

    `scores` are the sequence scores that entered the loss (sums, or means when length-
    normalised); everything but `losses` is detached.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor


def reference_pair_loss(
    logp_sums: Tensor,
    token_counts: Tensor,
    reference_sums: Tensor | None,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    average_logprobs: bool = False,
    rpo_alpha: float = 0.0,
) -> PairLoss:
    """A DPO-family loss (`dpo_loss`) from summed completion log-probs, plus the RPO term.

    With s = Σₜ log π(yₜ | x, y<ₜ) and n = |y| for chosen (+) and rejected (−) responses, the
    sequence score is ℓ = s, or s / n with `average_logprobs` (IPO's choice), and

        L = dpo_loss(ℓ⁺, ℓ⁻, ℓ_ref⁺, ℓ_ref⁻) + α · (−s⁺ / n⁺)

    where the last term is RPO's token-mean NLL of y⁺ (Pang et al. 2024, arXiv:2404.19733).

    Args:
        logp_sums: (2, pairs) summed completion log-probs under the policy, row 0 chosen.
        token_counts: (2, pairs) completion token counts, same layout.
        reference_sums: (2, pairs) summed log-probs under the reference model.
    """
    if reference_sums is None:
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probs.")
    scale = token_counts.to(logp_sums.dtype) if average_logprobs else 1.0
    chosen_scores, rejected_scores = logp_sums / scale
    reference_chosen, reference_rejected = reference_sums.to(logp_sums) / scale
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen_scores,
        rejected_scores,
        reference_chosen,
        reference_rejected,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )
    return PairLoss(
        _add_rpo(losses, logp_sums, token_counts, rpo_alpha),
        chosen_rewards,
        rejected_rewards,
        chosen_scores.detach(),
        rejected_scores.detach(),
    )


def simpo_pair_loss(
    logp_sums: Tensor,
    token_counts: Tensor,
    reference_sums: Tensor | None = None,
    *,
    beta: float,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
    rpo_alpha: float = 0.0,
) -> PairLoss:
    """`simpo_loss` from summed completion log-probs, plus the RPO term (see
    `reference_pair_loss`); reference-free, so `reference_sums` is ignored.

        L = simpo_loss(s⁺, s⁻, n⁺, n⁻) + α · (−s⁺ / n⁺)

    The scores are the length-normalised log-probs s / n.
    """
    chosen_counts, rejected_counts = token_counts.to(logp_sums.dtype)
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        logp_sums[0],
        logp_sums[1],
        chosen_counts,
        rejected_counts,
        beta=beta,
        gamma_beta_ratio=gamma_beta_ratio,
        label_smoothing=label_smoothing,
    )
    chosen_scores, rejected_scores = (logp_sums / token_counts.to(logp_sums.dtype)).detach()
    return PairLoss(
        _add_rpo(losses, logp_sums, token_counts, rpo_alpha),
        chosen_rewards,
        rejected_rewards,
        chosen_scores,
        rejected_scores,
    )


def _add_rpo(losses: Tensor, logp_sums: Tensor, token_counts: Tensor, rpo_alpha: float) -> Tensor:
    """losses + α · (−s⁺ / n⁺), RPO's token-mean NLL of the chosen responses."""
    if not rpo_alpha:
        return losses
    return losses + rpo_alpha * (-logp_sums[0] / token_counts[0].to(logp_sums.dtype))


def reward_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Fraction of pairs whose chosen reward is strictly higher (ties count as wrong).

    Args:
        chosen_rewards: (batch,) rewards of the preferred responses.
        rejected_rewards: (batch,) rewards of the other responses.

    Returns:
        Scalar float tensor in [0, 1].
    """
    require_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return (chosen_rewards > rejected_rewards).float().mean()


def _smoothed_logistic_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """−(1 − ε) log σ(x) − ε log σ(−x), the logistic loss with label-flip rate ε."""
    losses = -F.logsigmoid(logits)
    if label_smoothing == 0.0:
        return losses
    return (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)


def _require_positive_beta(beta: float) -> None:
    """Raise a ValueError unless β > 0."""
    if not beta > 0:
        raise ValueError(f"beta must be positive but is {beta}.")


def _require_valid_label_smoothing(label_smoothing: float) -> None:
    """Raise a ValueError unless ε lies in [0, 0.5)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must lie in [0, 0.5) (the assumed label-flip rate) but is "
            f"{label_smoothing}."
        )
