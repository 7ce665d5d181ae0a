"""PPO and group-baseline math for RLHF: advantages, KL penalties, clipped losses.

Pure functions of tensors; no models, no I/O. Conventions shared by every function:

- Per-token tensors are ``(batch, seq)``. A mask of the same shape marks the tokens that count
  (the response tokens) with a non-zero entry; everything else (prompt, right padding) is
  ignored. Masked-out positions may hold any value, NaN and inf included: they never reach a
  result, a statistic or a gradient.
- Rewards, values, advantages and returns are constants of the policy update: functions that
  produce them detach their inputs.
- Statistics are 0-dim detached tensors, so logging them does not force a device sync.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_core.algorithms.options import GROUP_ADVANTAGE_KINDS, KL_ESTIMATORS


def _require_same_shape(**tensors: torch.Tensor) -> None:
    """Raise a ValueError naming the tensors when their shapes differ."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"Expected tensors of one shape but got {listed}; pass (batch, seq) each.")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is non-zero.

    ``mean = Σ_i m_i x_i / Σ_i m_i`` with ``m`` the 0/1 mask, over all entries (``dim=None``,
    0-dim result) or along ``dim``. A slice with no masked-in entry has mean 0.
    """
    _require_same_shape(x=x, mask=mask)
    is_token = mask.bool()
    total = torch.where(is_token, x, torch.zeros_like(x))
    count = is_token.sum() if dim is None else is_token.sum(dim)
    total = total.sum() if dim is None else total.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the entries where ``mask`` is non-zero (0-dim).

    ``var = Σ_i m_i (x_i − μ)² / (n − 1)`` with ``μ`` the masked mean and ``n = Σ_i m_i``
    (Bessel's correction; ``unbiased=False`` divides by ``n``).

    Raises:
        ValueError: if fewer than two entries (one when ``unbiased=False``) are masked in.
    """
    count = int(mask.bool().sum())
    needed = 2 if unbiased else 1
    if count < needed:
        raise ValueError(
            f"masked_var needs at least {needed} masked-in entries but got {count}; "
            "check the mask or pass unbiased=False for a single entry."
        )
    centered = x - masked_mean(x, mask)
    variance = masked_mean(centered * centered, mask)
    return variance * count / (count - 1) if unbiased else variance


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce_sums: Callable[[list[float]], list[float]] | None = None,
) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the masked-in entries.

    ``x̂ = (x − μ) / sqrt(σ² + eps)`` with ``μ`` the masked mean and ``σ²`` the unbiased
    masked variance; with ``shift_mean=False`` the mean is added back, ``x̂ + μ`` (rescale only).
    Masked-out entries are returned as 0. Used on PPO advantages as in the original PPO code
    (Schulman et al. 2017, arXiv:1707.06347).

    When a batch is split across processes, ``reduce_sums`` (element-wise sums of a list of
    floats over every process, a collective) makes ``μ`` and ``σ²`` those of the whole batch
    (`global_masked_moments`), so each process whitens its shard as one process would whiten
    the union.

    Raises:
        ValueError: if fewer than two entries are masked in (over every process).
    """
    if reduce_sums is None:
        mean = masked_mean(x, mask)
        variance = masked_var(x, mask, unbiased=True)
    else:
        mean, variance = global_masked_moments(x, mask, reduce_sums)
    whitened = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def global_masked_moments(
    x: torch.Tensor, mask: torch.Tensor, reduce_sums: Callable[[list[float]], list[float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and unbiased variance of ``x`` over the masked-in entries of every process.

    Two passes, as ``masked_var`` on the union: ``μ = Σ m x / n`` from the summed counts and
    sums, then ``σ² = Σ m (x − μ)² / (n − 1)`` from the summed squared deviations (not
    ``E[x²] − μ²``, which cancels badly). ``reduce_sums`` sums a list of floats over every
    process (float64); each process must call this function at the same point. Returns 0-dim
    float64 tensors on ``x``'s device.

    Raises:
        ValueError: if fewer than two entries are masked in over every process.
    """
    _require_same_shape(x=x, mask=mask)
    is_token = mask.bool()
    zeros = torch.zeros((), dtype=torch.float64, device=x.device)
    local = torch.where(is_token, x.detach().double(), zeros)
    count, total = reduce_sums([float(is_token.sum()), float(local.sum())])
    if count < 2:
        raise ValueError(
            f"whitening needs at least 2 masked-in entries over every process but got "
            f"{int(count)}; check the mask."
        )
    mean = torch.tensor(total / count, dtype=torch.float64, device=x.device)
    deviations = torch.where(is_token, local - mean, zeros)
    (squares,) = reduce_sums([float((deviations * deviations).sum())])
    variance = torch.tensor(squares / (count - 1), dtype=torch.float64, device=x.device)
    return mean, variance


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over the masked-in tokens of each sequence.

    Schulman, Moritz, Levine, Jordan, Abbeel 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", arXiv:1506.02438:

        δ_t = r_t + γ V_{t+1} − V_t,    A_t = Σ_l (γλ)^l δ_{t+l},    R_t = A_t + V_t

    Each row is one episode made of its masked-in tokens, taken in order: masked-out tokens
    (the prompt on the left, padding on the right, or any hole in between) are skipped, the
    episode ends at the last masked-in token and the value after it is 0. Masked-out positions
    get advantage 0 and return 0. Rewards and values are constants (no gradient flows).

    Args:
        rewards: per-token rewards, ``(batch, seq)``.
        values: per-token value estimates V_t, ``(batch, seq)``.
        mask: non-zero on the tokens of the episode, ``(batch, seq)``.
        gamma: discount γ in [0, 1].
        lam: GAE parameter λ in [0, 1]; λ=1 gives Monte-Carlo returns, λ=0 one-step TD.

    Returns:
        ``(advantages, returns)``, each ``(batch, seq)``.
    """
    _require_same_shape(rewards=rewards, values=values, mask=mask)
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must lie in [0, 1] but got gamma={gamma}, lam={lam}.")
    with torch.no_grad():
        rewards, values = rewards.detach(), values.detach()
        is_token = mask.bool()
        zeros = torch.zeros_like(rewards[:, 0])  # (batch,)
        next_value, next_advantage = zeros, zeros
        advantages_reversed = []
        for t in reversed(range(rewards.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantage = delta + gamma * lam * next_advantage
            # Masked-out tokens pass the running value and advantage through unchanged.
            next_value = torch.where(is_token[:, t], values[:, t], next_value)
            next_advantage = torch.where(is_token[:, t], advantage, next_advantage)
            advantages_reversed.append(torch.where(is_token[:, t], advantage, zeros))
        advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (batch, seq)
        returns = torch.where(is_token, advantages + values, torch.zeros_like(values))
    return advantages, returns


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from the log-probs of tokens sampled from π.

    Schulman 2020, "Approximating KL Divergence" (blog post, joschu.net/blog/kl-approx.html),
    with ``log r = ref_logp − logp``:

    - ``k1 = logp − ref_logp``          unbiased, high variance, can be negative;
    - ``k2 = ½ (logp − ref_logp)²``     biased, low variance, non-negative;
    - ``k3 = (r − 1) − log r``          unbiased, low variance, non-negative;
    - ``abs = |logp − ref_logp|``       biased, non-negative.

    Elementwise, so any shape works; gradients flow (usable as a loss term).
    """
    _require_same_shape(logps=logps, ref_logps=ref_logps)
    log_ratio = logps - ref_logps
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio * log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r − 1) − log r with log r = −log_ratio
    if kind == "abs":
        return log_ratio.abs()
    raise ValueError(
        f"Unknown KL estimator kind {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}."
    )


class AdaptiveKLController:
    """Proportional controller that steers the KL coefficient β towards a target KL.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
    arXiv:1909.08593, section 2.2:

        e_t = clip(KL_t / KL_target − 1, −0.2, 0.2),    β_{t+1} = β_t (1 + K_β e_t)

    with ``K_β = n_steps / horizon``. ``value`` holds the current β.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be non-negative but got {init_kl_coef}.")
        if target <= 0 or horizon <= 0:
            raise ValueError(
                f"target and horizon must be positive but got target={target}, horizon={horizon}."
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Apply one step of the rule above for the observed KL; return the new β."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be non-negative but got {n_steps}.")
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """KL coefficient that never changes; same interface as ``AdaptiveKLController``."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be non-negative but got {kl_coef}.")
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Do nothing and return the fixed β (the arguments are accepted for compatibility)."""
        return self.value


def penalise_unfinished(
    scores: torch.Tensor,
    ended: torch.Tensor,
    penalty: float = 1.0,
    fixed_score: float | None = None,
) -> torch.Tensor:
    """Scores with the unfinished responses (no end token within the length limit) marked:

        s'_i = s_i                 if response i ended
        s'_i = s_i − penalty       if it did not and `fixed_score` is None
        s'_i = fixed_score         if it did not and `fixed_score` is set

    A reward model can score a response that was cut off higher than the same text finished
    (the end token is evidence it was trained on), and a policy then learns never to stop; the
    penalty, or a fixed low score, must outweigh that gap. TRL's `missing_eos_penalty`; Huang
    et al. 2024, "The N+ Implementation Details of RLHF with PPO", arXiv:2403.17031.

    Args:
        scores: (n,) reward-model scores.
        ended: (n,) bool, whether each response emitted an end token.
        penalty: subtracted from unfinished responses' scores (≥ 0).
        fixed_score: when set, the score of every unfinished response instead.
    """
    _require_same_shape(scores=scores, ended=ended)
    if not penalty >= 0:
        raise ValueError(f"penalty must be non-negative but is {penalty}.")
    unfinished = ~ended.to(device=scores.device, dtype=torch.bool)
    if fixed_score is not None:
        return torch.where(unfinished, torch.full_like(scores, fixed_score), scores)
    return scores - penalty * unfinished.to(scores.dtype)


def shape_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token RLHF rewards: a KL penalty on every response token, the score at the last one.

    ``r_t = −β · KL_t + [t = T] · score`` with ``KL_t = kl_penalty(logp_t, ref_logp_t, kind)``
    and ``T`` the last masked-in token of the sequence (Ziegler et al. 2019, arXiv:1909.08593;
    Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
    arXiv:2203.02155). Inputs are detached: rewards are constants of the update.

    Args:
        scores: reward-model score per sequence, ``(batch,)``.
        logps, ref_logps: log-probs of the sampled tokens under policy and reference,
            ``(batch, seq)``.
        mask: non-zero on response tokens, ``(batch, seq)``.
        kl_coef: β, e.g. ``controller.value``.
        kind: KL estimator, see ``kl_penalty``.

    Returns:
        ``(rewards, kl)``, each ``(batch, seq)`` and 0 on masked-out positions.

    Raises:
        ValueError: if a sequence has no masked-in token (its score would have nowhere to go).
    """
    _require_same_shape(logps=logps, ref_logps=ref_logps, mask=mask)
    if scores.shape != logps.shape[:1]:
        raise ValueError(
            f"scores must have shape (batch,) = {tuple(logps.shape[:1])} "
            f"but got {tuple(scores.shape)}; pass one score per sequence."
        )
    is_token = mask.bool()
    empty_rows = (~is_token.any(dim=1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(
            f"Sequences {empty_rows} have no response token in the mask, so their score has "
            "nowhere to go; drop them or fix the mask."
        )
    with torch.no_grad():
        kl = kl_penalty(logps.detach(), ref_logps.detach(), kind)
        kl = torch.where(is_token, kl, torch.zeros_like(kl))  # (batch, seq)
        rewards = -kl_coef * kl
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(is_token)
        last_token = torch.where(is_token, positions, -1).amax(dim=1)  # (batch,)
        rows = torch.arange(mask.shape[0], device=mask.device)
        rewards[rows, last_token] += scores.detach().to(rewards.dtype)
    return rewards, kl


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss, averaged over masked-in tokens.

    Schulman, Wolski, Dhariwal, Radford, Klimov 2017, "Proximal Policy Optimization
    Algorithms", arXiv:1707.06347, eq. 7:

        ρ_t = exp(logp_t − old_logp_t),    L = −mean_t min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)

    Gradients flow through ``logps`` only; ``old_logps`` and ``advantages`` are constants.

    Returns:
        ``(loss, stats)`` with 0-dim ``loss`` and detached 0-dim stats, all over masked-in tokens:

        - ``clip_fraction``: fraction of tokens where the clipped term is strictly smaller and
          so selected, i.e. ``A > 0 and ρ > 1+ε`` or ``A < 0 and ρ < 1−ε``: exactly the tokens
          whose gradient the clip sets to zero.
        - ``approx_kl``: mean of ``(ρ − 1) − log ρ``, the k3 estimator of KL(π_old‖π_θ)
          (Schulman 2020, "Approximating KL Divergence"); 0 when the policies agree.
        - ``ratio_mean``: mean of ``ρ``.
    """
    _require_same_shape(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask)
    if clip_range <= 0:
        raise ValueError(f"clip_range must be positive but got {clip_range}.")
    is_token = mask.bool()
    # Zero the log-ratio and advantage off the mask first, so that junk in padding cannot turn
    # into inf/NaN through exp (NaN gradients leak through torch.where otherwise).
    log_ratio = torch.where(is_token, logps - old_logps.detach(), torch.zeros_like(logps))
    advantages = torch.where(is_token, advantages.detach(), torch.zeros_like(logps))
    ratio = torch.exp(log_ratio)  # (batch, seq)
    unclipped_objective = ratio * advantages
    clipped_objective = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    objective = torch.minimum(unclipped_objective, clipped_objective)
    loss = -masked_mean(objective, mask)
    with torch.no_grad():
        is_clipped = (clipped_objective < unclipped_objective).to(logps.dtype)
        stats = {
            "clip_fraction": masked_mean(is_clipped, mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss of PPO, averaged over masked-in tokens.

    ``L = ½ · mean_t max((V_t − R_t)², (clip(V_t, V_old,t − ε, V_old,t + ε) − R_t)²)``, the
    value clipping of the PPO reference implementation (OpenAI baselines ppo2; Schulman et al.
    2017, arXiv:1707.06347), as used for RLHF critics by Ziegler et al. 2019 (arXiv:1909.08593).
    Pass ``clip_range_value=float("inf")`` for the plain squared error. Gradients flow through
    ``values`` only.

    Returns:
        ``(loss, stats)``; ``stats["value_clip_fraction"]`` is the fraction of masked-in tokens
        where the clipped error is strictly larger and so selected: exactly the tokens whose
        gradient the clip sets to zero.
    """
    _require_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip_range_value <= 0:
        raise ValueError(f"clip_range_value must be positive but got {clip_range_value}.")
    is_token = mask.bool()
    zeros = torch.zeros_like(values)
    # Zero everything off the mask first so junk in padding cannot reach the loss or gradient.
    values = torch.where(is_token, values, zeros)
    old_values = torch.where(is_token, old_values.detach(), zeros)
    returns = torch.where(is_token, returns.detach(), zeros)
    clipped_values = old_values + torch.clamp(
        values - old_values, -clip_range_value, clip_range_value
    )
    unclipped_error = (values - returns) ** 2  # (batch, seq)
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        is_clipped = (clipped_error > unclipped_error).to(values.dtype)
        stats = {"value_clip_fraction": masked_mean(is_clipped, mask)}
    return loss, stats


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    kind: str = "grpo",
    eps: float = 1e-6,
    scale: bool = True,
) -> torch.Tensor:
    """Sequence-level advantages from a baseline shared by the samples of one prompt.

    ``rewards`` is ``(batch,)``; consecutive blocks of ``group_size`` entries are samples for the
    same prompt. For sample ``i`` of a group ``G``:

    - ``"grpo"``: ``A_i = (r_i − mean_G r) / (std_G r + eps)`` with the unbiased group std
      (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300). ``scale=False`` drops the division,
      ``A_i = r_i − mean_G r`` (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783).
    - ``"rloo"``: ``A_i = r_i − 1/(k−1) Σ_{j≠i} r_j``, the leave-one-out baseline (Kool, van Hoof,
      Welling 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al. 2024,
      "Back to Basics", arXiv:2402.14740). ``scale`` and ``eps`` do not apply.

    Advantages are constants: the result carries no gradient.

    Returns:
        advantages, ``(batch,)``.
    """
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D (batch,) but got shape {tuple(rewards.shape)}; "
            "pass one reward per sample."
        )
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 to form a baseline but got {group_size}.")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"batch size {rewards.shape[0]} is not a multiple of group_size {group_size}; "
            "sample the same number of completions for every prompt."
        )
    if kind not in GROUP_ADVANTAGE_KINDS:
        raise ValueError(
            f"Unknown group advantage kind {kind!r}; "
            f"choose one of {', '.join(GROUP_ADVANTAGE_KINDS)}."
        )
    rewards = rewards.detach()
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = rewards.reshape(-1, group_size)  # (n_groups, group_size)
    group_sum = grouped.sum(dim=1, keepdim=True)
    if kind == "rloo":
        advantages = grouped - (group_sum - grouped) / (group_size - 1)
    else:
        advantages = grouped - group_sum / group_size
        if scale:
            advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)
