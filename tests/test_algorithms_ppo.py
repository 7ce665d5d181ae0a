"""Tests for rlhf_core/algorithms/ppo.py: GAE, whitening, KL estimators and controllers, PPO,
GRPO and RLOO math."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_core.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    shape_rewards,
    whiten,
)

# ---------------------------------------------------------------------------------------------
# Helpers: masks and plain-loop references
# ---------------------------------------------------------------------------------------------


def response_mask(prompt_lengths: list[int], response_lengths: list[int], seq: int) -> torch.Tensor:
    """Mask with a masked-out prompt on the left, the response, then right padding."""
    mask = torch.zeros(len(prompt_lengths), seq, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
        mask[row, prompt : prompt + response] = 1
    return mask


def reference_gae(rewards, values, mask, gamma, lam):
    """GAE for each row separately: a plain backward loop over the masked-in positions."""
    advantages = torch.zeros_like(rewards)
    returns = torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[row, t]]
        running = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_value = values[row, steps[i + 1]].item() if i + 1 < len(steps) else 0.0
            delta = rewards[row, t].item() + gamma * next_value - values[row, t].item()
            running = delta + gamma * lam * running
            advantages[row, t] = running
            returns[row, t] = running + values[row, t].item()
    return advantages, returns


def reference_policy_loss(logps, old_logps, advantages, mask, clip_range):
    """Clipped surrogate loss and clip fraction from a python loop over the masked-in tokens."""
    objectives, clipped = [], []
    for row in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            if not mask[row, t]:
                continue
            ratio = math.exp(logps[row, t].item() - old_logps[row, t].item())
            advantage = advantages[row, t].item()
            clipped_ratio = min(max(ratio, 1 - clip_range), 1 + clip_range)
            objectives.append(min(ratio * advantage, clipped_ratio * advantage))
            clipped.append(clipped_ratio * advantage < ratio * advantage)
    return -sum(objectives) / len(objectives), sum(clipped) / len(clipped)


def random_batch(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Random per-token tensors of one shape, float64 so comparisons can be tight."""
    generator = torch.Generator().manual_seed(seed)

    def draw():
        return torch.randn(batch, seq, generator=generator, dtype=torch.float64)

    return {
        "rewards": draw(),
        "values": draw(),
        "logps": -draw().abs(),
        "ref_logps": -draw().abs(),
        "advantages": draw(),
        "returns": draw(),
    }


# ---------------------------------------------------------------------------------------------
# masked_mean, masked_var, whiten
# ---------------------------------------------------------------------------------------------


def test_masked_mean_and_var_match_plain_statistics_of_selected_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, 6.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    selected = [1.0, 2.0, 3.0, 4.0, 6.0, 7.0]
    assert masked_mean(x, mask).item() == pytest.approx(statistics.mean(selected))
    assert masked_var(x, mask).item() == pytest.approx(statistics.variance(selected))
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(
        statistics.pvariance(selected)
    )
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 17.0 / 3.0]))


def test_masked_mean_of_empty_slice_is_zero_and_ignores_nan_in_masked_out_entries():
    x = torch.tensor([[float("nan"), float("inf")], [1.0, 3.0]])
    mask = torch.tensor([[0, 0], [1, 1]])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([0.0, 2.0]))
    assert masked_mean(x, mask).item() == pytest.approx(2.0)


def test_masked_var_needs_two_entries_and_shapes_must_match():
    x = torch.tensor([[1.0, 2.0]])
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1, 0]]))
    assert masked_var(x, torch.tensor([[1, 0]]), unbiased=False).item() == 0.0
    with pytest.raises(ValueError, match="one shape"):
        masked_mean(x, torch.tensor([1, 0]))


def test_whiten_gives_zero_mean_unit_std_over_mask_and_zero_elsewhere():
    generator = torch.Generator().manual_seed(0)
    x = 3.0 + 5.0 * torch.randn(4, 9, generator=generator, dtype=torch.float64)
    mask = response_mask([0, 2, 1, 3], [9, 4, 6, 2], seq=9)
    whitened = whiten(x, mask)
    selected = whitened[mask.bool()]
    assert selected.mean().item() == pytest.approx(0.0, abs=1e-10)
    assert selected.std().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(whitened[~mask.bool()] == 0)

    kept_mean = whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept_mean.mean().item() == pytest.approx(x[mask.bool()].mean().item())
    assert kept_mean.std().item() == pytest.approx(1.0, abs=1e-6)


def test_whiten_ignores_values_at_masked_out_entries():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, generator=generator)
    mask = response_mask([1, 0, 2], [3, 6, 2], seq=6)
    changed = torch.where(mask.bool(), x, torch.full_like(x, 1e6))
    changed[0, 0] = float("nan")
    torch.testing.assert_close(whiten(changed, mask), whiten(x, mask))


# ---------------------------------------------------------------------------------------------
# compute_gae
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_compute_gae_matches_per_sequence_loop_with_prompt_and_padding(gamma, lam):
    tensors = random_batch(batch=5, seq=10, seed=2)
    mask = response_mask([0, 3, 1, 0, 6], [10, 4, 8, 1, 2], seq=10)
    advantages, returns = compute_gae(tensors["rewards"], tensors["values"], mask, gamma, lam)
    expected_advantages, expected_returns = reference_gae(
        tensors["rewards"], tensors["values"], mask, gamma, lam
    )
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)


def test_compute_gae_skips_holes_in_the_mask():
    tensors = random_batch(batch=2, seq=8, seed=3)
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0], [1, 0, 1, 0, 1, 0, 1, 1]])
    advantages, returns = compute_gae(tensors["rewards"], tensors["values"], mask, 0.97, 0.9)
    expected_advantages, expected_returns = reference_gae(
        tensors["rewards"], tensors["values"], mask, 0.97, 0.9
    )
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)


def test_compute_gae_with_lam_and_gamma_one_is_reward_to_go_minus_values():
    tensors = random_batch(batch=3, seq=7, seed=4)
    rewards, values = tensors["rewards"], tensors["values"]
    mask = response_mask([0, 2, 1], [7, 3, 5], seq=7)
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for row in range(3):
        for t in range(7):
            if mask[row, t]:
                reward_to_go = sum(rewards[row, s].item() for s in range(t, 7) if mask[row, s])
                assert returns[row, t].item() == pytest.approx(reward_to_go)
                assert advantages[row, t].item() == pytest.approx(
                    reward_to_go - values[row, t].item()
                )
            else:
                assert advantages[row, t].item() == 0.0 and returns[row, t].item() == 0.0


def test_compute_gae_with_lam_zero_is_one_step_td_error():
    tensors = random_batch(batch=2, seq=6, seed=5)
    rewards, values = tensors["rewards"], tensors["values"]
    mask = response_mask([1, 0], [4, 6], seq=6)
    gamma = 0.9
    advantages, _ = compute_gae(rewards, values, mask, gamma=gamma, lam=0.0)
    for row in range(2):
        steps = [t for t in range(6) if mask[row, t]]
        for i, t in enumerate(steps):
            next_value = values[row, steps[i + 1]].item() if i + 1 < len(steps) else 0.0
            td_error = rewards[row, t].item() + gamma * next_value - values[row, t].item()
            assert advantages[row, t].item() == pytest.approx(td_error)


def test_compute_gae_carries_no_gradient_and_validates_arguments():
    rewards = torch.randn(2, 4, requires_grad=True)
    values = torch.randn(2, 4, requires_grad=True)
    mask = torch.ones(2, 4)
    advantages, returns = compute_gae(rewards, values, mask)
    assert not advantages.requires_grad and not returns.requires_grad
    with pytest.raises(ValueError, match="gamma and lam"):
        compute_gae(rewards, values, mask, gamma=1.5)
    with pytest.raises(ValueError, match="one shape"):
        compute_gae(rewards, values[:, :3], mask)


# ---------------------------------------------------------------------------------------------
# Padding invariance (hypothesis)
# ---------------------------------------------------------------------------------------------


@st.composite
def padded_batches(draw):
    """A batch with prompt/response/padding layout, plus junk padding columns to append."""
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(2, 6))
    prompt_lengths, response_lengths = [], []
    for _ in range(batch):
        prompt = draw(st.integers(0, seq - 1))
        prompt_lengths.append(prompt)
        response_lengths.append(draw(st.integers(1, seq - prompt)))
    if sum(response_lengths) < 2:  # whiten needs two tokens
        prompt_lengths[0], response_lengths[0] = 0, 2
    return {
        "mask": response_mask(prompt_lengths, response_lengths, seq),
        "tensors": random_batch(batch, seq, draw(st.integers(0, 10_000))),
        "pad_length": draw(st.integers(1, 4)),
        "pad_value": draw(st.sampled_from([0.0, -7.0, 1e4, float("inf"), float("nan")])),
    }


def append_padding(tensor: torch.Tensor, pad_length: int, pad_value: float) -> torch.Tensor:
    """Append ``pad_length`` columns of junk: random numbers, with ``pad_value`` in the first."""
    junk = 100.0 * torch.randn(tensor.shape[0], pad_length, dtype=tensor.dtype)
    junk[:, 0] = pad_value
    return torch.cat([tensor, junk], dim=1)


@settings(max_examples=40, deadline=None)
@given(padded_batches())
def test_appending_padding_changes_nothing_at_real_positions(case):
    mask, tensors, pad_length = case["mask"], case["tensors"], case["pad_length"]
    seq = mask.shape[1]
    padded = {
        name: append_padding(tensor, pad_length, case["pad_value"])
        for name, tensor in tensors.items()
    }
    padded_mask = torch.cat([mask, torch.zeros(mask.shape[0], pad_length, dtype=mask.dtype)], 1)

    advantages, returns = compute_gae(tensors["rewards"], tensors["values"], mask, 0.99, 0.9)
    padded_advantages, padded_returns = compute_gae(
        padded["rewards"], padded["values"], padded_mask, 0.99, 0.9
    )
    torch.testing.assert_close(padded_advantages[:, :seq], advantages)
    torch.testing.assert_close(padded_returns[:, :seq], returns)
    assert torch.all(padded_advantages[:, seq:] == 0) and torch.all(padded_returns[:, seq:] == 0)

    whitened = whiten(tensors["advantages"], mask)
    padded_whitened = whiten(padded["advantages"], padded_mask)
    torch.testing.assert_close(padded_whitened[:, :seq], whitened)
    assert torch.all(padded_whitened[:, seq:] == 0)

    for kind in ("k1", "k2", "k3", "abs"):
        kl = kl_penalty(tensors["logps"], tensors["ref_logps"], kind)
        padded_kl = kl_penalty(padded["logps"], padded["ref_logps"], kind)
        torch.testing.assert_close(padded_kl[:, :seq], kl)

    scores = tensors["values"][:, 0]
    rewards, kl = shape_rewards(scores, tensors["logps"], tensors["ref_logps"], mask, 0.1, "k3")
    padded_rewards, padded_kl = shape_rewards(
        scores, padded["logps"], padded["ref_logps"], padded_mask, 0.1, "k3"
    )
    torch.testing.assert_close(padded_rewards[:, :seq], rewards)
    torch.testing.assert_close(padded_kl[:, :seq], kl)
    assert torch.all(padded_rewards[:, seq:] == 0) and torch.all(padded_kl[:, seq:] == 0)


@settings(max_examples=40, deadline=None)
@given(padded_batches())
def test_appending_padding_changes_neither_ppo_losses_nor_their_gradients(case):
    mask, tensors, pad_length = case["mask"], case["tensors"], case["pad_length"]
    seq = mask.shape[1]
    padded_mask = torch.cat([mask, torch.zeros(mask.shape[0], pad_length, dtype=mask.dtype)], 1)
    old_logps = tensors["ref_logps"]

    def policy_loss_and_grad(logps, old, advantages, loss_mask):
        logps = logps.clone().requires_grad_(True)
        loss, stats = ppo_policy_loss(logps, old, advantages, loss_mask, clip_range=0.2)
        loss.backward()
        return loss, stats, logps.grad

    def value_loss_and_grad(values, old_values, returns, loss_mask):
        values = values.clone().requires_grad_(True)
        loss, stats = ppo_value_loss(values, old_values, returns, loss_mask, 0.2)
        loss.backward()
        return loss, stats, values.grad

    pad = case["pad_value"]
    loss, stats, grad = policy_loss_and_grad(
        tensors["logps"], old_logps, tensors["advantages"], mask
    )
    padded_loss, padded_stats, padded_grad = policy_loss_and_grad(
        append_padding(tensors["logps"], pad_length, pad),
        append_padding(old_logps, pad_length, -pad),
        append_padding(tensors["advantages"], pad_length, pad),
        padded_mask,
    )
    torch.testing.assert_close(padded_loss, loss)
    torch.testing.assert_close(padded_grad[:, :seq], grad)
    assert torch.all(padded_grad[:, seq:] == 0)
    for name, value in stats.items():
        torch.testing.assert_close(padded_stats[name], value)

    loss, stats, grad = value_loss_and_grad(
        tensors["values"], tensors["rewards"], tensors["returns"], mask
    )
    padded_loss, padded_stats, padded_grad = value_loss_and_grad(
        append_padding(tensors["values"], pad_length, pad),
        append_padding(tensors["rewards"], pad_length, -pad),
        append_padding(tensors["returns"], pad_length, pad),
        padded_mask,
    )
    torch.testing.assert_close(padded_loss, loss)
    torch.testing.assert_close(padded_grad[:, :seq], grad)
    assert torch.all(padded_grad[:, seq:] == 0)
    torch.testing.assert_close(padded_stats["value_clip_fraction"], stats["value_clip_fraction"])


# ---------------------------------------------------------------------------------------------
# KL estimators and controllers
# ---------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logps = torch.tensor([math.log(0.5), math.log(0.1)], dtype=torch.float64)
    ref_logps = torch.tensor([math.log(0.25), math.log(0.4)], dtype=torch.float64)
    # Token 1: logp − ref = log 2, r = 0.5.  Token 2: logp − ref = −log 4, r = 4.
    expected = {
        "k1": [math.log(2), -math.log(4)],
        "k2": [0.5 * math.log(2) ** 2, 0.5 * math.log(4) ** 2],
        "k3": [(0.5 - 1) - math.log(0.5), (4 - 1) - math.log(4)],
        "abs": [math.log(2), math.log(4)],
    }
    for kind, values in expected.items():
        torch.testing.assert_close(
            kl_penalty(logps, ref_logps, kind), torch.tensor(values, dtype=torch.float64)
        )


def test_unknown_kl_kind_raises_listing_valid_kinds():
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        kl_penalty(torch.zeros(2), torch.zeros(2), kind="k4")


def test_k1_and_k3_are_unbiased_monte_carlo_estimators_of_kl():
    p = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    q = torch.tensor([0.3, 0.1, 0.2, 0.2, 0.2], dtype=torch.float64)
    exact_kl = sum(p[i].item() * math.log(p[i].item() / q[i].item()) for i in range(5))
    generator = torch.Generator().manual_seed(6)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    logps, ref_logps = p.log()[samples], q.log()[samples]
    for kind in ("k1", "k3"):
        estimate = kl_penalty(logps, ref_logps, kind).mean().item()
        assert estimate == pytest.approx(exact_kl, abs=0.005), kind
    # k2 is biased: its Monte-Carlo mean converges to E_p[k2] ≠ KL(p‖q), farther away than the
    # tolerance above, which shows this test can tell a biased estimator apart.
    expected_k2 = sum(
        0.5 * p[i].item() * math.log(p[i].item() / q[i].item()) ** 2 for i in range(5)
    )
    assert abs(expected_k2 - exact_kl) > 0.01
    assert kl_penalty(logps, ref_logps, "k2").mean().item() == pytest.approx(expected_k2, abs=0.005)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-40.0, 40.0), min_size=1, max_size=8), st.floats(-40.0, 40.0))
def test_k3_is_never_negative(logps, ref_logp):
    logps_tensor = torch.tensor(logps, dtype=torch.float64)
    kl = kl_penalty(logps_tensor, torch.full_like(logps_tensor, ref_logp), "k3")
    assert torch.all(kl >= 0)


def test_adaptive_kl_controller_follows_ziegler_update_step_by_step():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=1000)
    observed_kls = [6.0, 12.0, 3.0, 6.6, 0.0, 5.4, torch.tensor(7.5)]
    # e_t = clip(KL/6 − 1, ±0.2) worked out by hand:
    #   0, 1 → 0.2, −0.5 → −0.2, 0.1, −1 → −0.2, −0.1, 0.25 → 0.2
    errors_by_hand = [0.0, 0.2, -0.2, 0.1, -0.2, -0.1, 0.2]
    n_steps = 100  # K_β = 100 / 1000 = 0.1
    expected_beta = 0.2
    for kl, error in zip(observed_kls, errors_by_hand, strict=True):
        expected_beta *= 1 + 0.1 * error
        returned = controller.update(kl, n_steps)
        assert controller.value == pytest.approx(expected_beta, rel=1e-12)
        assert returned == controller.value
    assert expected_beta == pytest.approx(0.2 * 1.02 * 0.98 * 1.01 * 0.98 * 0.99 * 1.02)


def test_fixed_kl_controller_never_changes_and_controllers_validate_arguments():
    controller = FixedKLController(0.05)
    for kl in (0.0, 100.0, -3.0):
        controller.update(kl, 256)
        assert controller.value == 0.05
    with pytest.raises(ValueError, match="positive"):
        AdaptiveKLController(0.1, target=0.0, horizon=1000)
    with pytest.raises(ValueError, match="positive"):
        AdaptiveKLController(0.1, target=6.0, horizon=-1)
    with pytest.raises(ValueError, match="non-negative"):
        FixedKLController(-0.1)


# ---------------------------------------------------------------------------------------------
# shape_rewards
# ---------------------------------------------------------------------------------------------


def test_shape_rewards_puts_score_on_last_real_token_and_kl_penalty_elsewhere():
    logps = torch.tensor([[-1.0, -1.0, -2.0, -0.5, -9.0], [-3.0, -0.1, -0.2, -0.3, -0.4]])
    ref_logps = torch.tensor([[-5.0, -1.5, -1.0, -0.5, -1.0], [-3.0, -0.4, -0.2, -0.1, -0.2]])
    # Row 0: prompt, 3 response tokens, padding.  Row 1: prompt, 4 response tokens.
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    scores = torch.tensor([2.0, -1.0])
    beta = 0.5
    rewards, kl = shape_rewards(scores, logps, ref_logps, mask, kl_coef=beta)
    expected_kl = torch.tensor([[0.0, 0.5, -1.0, 0.0, 0.0], [0.0, 0.3, 0.0, -0.2, -0.2]])
    expected_rewards = torch.tensor(
        [[0.0, -0.25, 0.5, 0.0 + 2.0, 0.0], [0.0, -0.15, 0.0, 0.1, 0.1 - 1.0]]
    )
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(rewards, expected_rewards)


def test_shape_rewards_carries_no_gradient_and_rejects_empty_responses():
    logps = torch.randn(2, 3, requires_grad=True)
    scores = torch.randn(2, requires_grad=True)
    rewards, kl = shape_rewards(scores, logps, torch.randn(2, 3), torch.ones(2, 3), 0.1)
    assert not rewards.requires_grad and not kl.requires_grad
    with pytest.raises(ValueError, match=r"Sequences \[1\]"):
        shape_rewards(scores, logps, logps, torch.tensor([[1, 1, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match="scores must have shape"):
        shape_rewards(torch.zeros(3), logps, logps, torch.ones(2, 3), 0.1)


# ---------------------------------------------------------------------------------------------
# ppo_policy_loss
# ---------------------------------------------------------------------------------------------


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    tensors = random_batch(batch=3, seq=5, seed=7)
    mask = response_mask([0, 1, 2], [5, 3, 2], seq=5)
    logps = tensors["logps"]
    loss, stats = ppo_policy_loss(logps, logps.clone(), tensors["advantages"], mask)
    expected = -tensors["advantages"][mask.bool()].mean()
    torch.testing.assert_close(loss, expected)
    assert stats["clip_fraction"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["approx_kl"].item() == pytest.approx(0.0)


def test_policy_loss_clips_only_in_the_binding_direction_and_zeroes_those_gradients():
    # Ratios 1.5, 1.5, 0.5, 0.5 against advantages +1, −1, +1, −1 with ε = 0.2:
    #   ρ=1.5, A=+1: min(1.5, 1.2) = 1.2   clipped (gradient 0)
    #   ρ=1.5, A=−1: min(−1.5, −1.2) = −1.5 unclipped
    #   ρ=0.5, A=+1: min(0.5, 0.8) = 0.5   unclipped
    #   ρ=0.5, A=−1: min(−0.5, −0.8) = −0.8 clipped (gradient 0)
    # loss = −(1.2 − 1.5 + 0.5 − 0.8) / 4 = 0.15; clip fraction = 2/4.
    old_logps = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -3.0]], dtype=torch.float64)
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 9.0]], dtype=torch.float64)
    logps = (old_logps + ratios.log()).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logps, old_logps, advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.15)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    expected_kl = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 4
    assert stats["approx_kl"].item() == pytest.approx(expected_kl)
    loss.backward()
    # d(−ρA/4)/dlogp = −ρA/4 on unclipped tokens.
    expected_grad = torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logps.grad, expected_grad)


@pytest.mark.parametrize("clip_range", [0.1, 0.2, 0.5])
def test_policy_loss_matches_loop_reference_and_clip_fraction_marks_zero_gradients(clip_range):
    tensors = random_batch(batch=4, seq=6, seed=8)
    mask = response_mask([0, 2, 1, 3], [6, 3, 4, 2], seq=6)
    old_logps = tensors["logps"]
    logps = (old_logps + 0.6 * tensors["rewards"]).requires_grad_(True)
    loss, stats = ppo_policy_loss(logps, old_logps, tensors["advantages"], mask, clip_range)
    expected_loss, expected_clip_fraction = reference_policy_loss(
        logps.detach(), old_logps, tensors["advantages"], mask, clip_range
    )
    assert loss.item() == pytest.approx(expected_loss)
    assert stats["clip_fraction"].item() == pytest.approx(expected_clip_fraction)
    assert 0 < expected_clip_fraction < 1  # the data exercise both branches
    loss.backward()
    zero_gradient = (logps.grad == 0) & mask.bool()
    n_tokens = mask.sum().item()
    assert zero_gradient.sum().item() / n_tokens == pytest.approx(stats["clip_fraction"].item())
    assert not stats["clip_fraction"].requires_grad


def test_policy_loss_rejects_non_positive_clip_range():
    with pytest.raises(ValueError, match="clip_range"):
        ppo_policy_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 0
        )


# ---------------------------------------------------------------------------------------------
# ppo_value_loss
# ---------------------------------------------------------------------------------------------


def test_value_loss_hand_example_with_clipping():
    # Old values 0, ε = 0.2:
    #   V=0.5, R=1: (0.5−1)² = 0.25 vs (0.2−1)² = 0.64 -> 0.64, clipped (gradient 0)
    #   V=0.5, R=0: (0.5−0)² = 0.25 vs (0.2−0)² = 0.04 -> 0.25, unclipped
    #   V=0.1, R=1: inside the range, both 0.81
    # loss = ½ (0.64 + 0.25 + 0.81) / 3; clip fraction 1/3.
    values = torch.tensor([[0.5, 0.5, 0.1, 7.0]], dtype=torch.float64, requires_grad=True)
    old_values = torch.zeros(1, 4, dtype=torch.float64)
    returns = torch.tensor([[1.0, 0.0, 1.0, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25 + 0.81) / 3)
    assert stats["value_clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    # d(½ (V − R)² / 3)/dV = (V − R) / 3 on unclipped tokens.
    expected_grad = torch.tensor([[0.0, 0.5 / 3, -0.9 / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(values.grad, expected_grad)


def test_value_loss_without_clipping_is_half_mean_squared_error():
    tensors = random_batch(batch=2, seq=4, seed=9)
    mask = response_mask([0, 1], [4, 2], seq=4)
    loss, stats = ppo_value_loss(
        tensors["values"], tensors["rewards"], tensors["returns"], mask, float("inf")
    )
    errors = (tensors["values"] - tensors["returns"])[mask.bool()]
    assert loss.item() == pytest.approx(0.5 * (errors**2).mean().item())
    assert stats["value_clip_fraction"].item() == 0.0
    with pytest.raises(ValueError, match="clip_range_value"):
        ppo_value_loss(tensors["values"], tensors["values"], tensors["returns"], mask, -1.0)


# ---------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------


def test_grpo_advantages_have_zero_mean_and_unit_std_per_group_and_match_loop():
    generator = torch.Generator().manual_seed(10)
    rewards = torch.randn(12, generator=generator, dtype=torch.float64)
    advantages = group_advantages(rewards, group_size=4, kind="grpo")
    for start in range(0, 12, 4):
        group = rewards[start : start + 4].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        for i in range(4):
            expected = (group[i] - mean) / (std + 1e-6)
            assert advantages[start + i].item() == pytest.approx(expected)
        block = advantages[start : start + 4]
        assert block.mean().item() == pytest.approx(0.0, abs=1e-12)
        assert block.std().item() == pytest.approx(1.0, abs=1e-4)


def test_grpo_without_scaling_only_subtracts_the_group_mean():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    advantages = group_advantages(rewards, group_size=3, kind="grpo", scale=False)
    torch.testing.assert_close(advantages, torch.tensor([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]))


def test_grpo_group_with_equal_rewards_gets_zero_advantage():
    advantages = group_advantages(torch.tensor([0.7, 0.7, 1.0, 0.0]), group_size=2)
    assert advantages[:2].tolist() == [0.0, 0.0]
    assert advantages[2].item() > 0 > advantages[3].item()


def test_rloo_advantages_match_leave_one_out_loop_and_sum_to_zero_per_group():
    generator = torch.Generator().manual_seed(11)
    rewards = torch.randn(10, generator=generator, dtype=torch.float64)
    advantages = group_advantages(rewards, group_size=5, kind="rloo")
    for start in range(0, 10, 5):
        group = rewards[start : start + 5].tolist()
        for i in range(5):
            others = [group[j] for j in range(5) if j != i]
            assert advantages[start + i].item() == pytest.approx(group[i] - sum(others) / 4)
        assert advantages[start : start + 5].sum().item() == pytest.approx(0.0, abs=1e-12)


def test_group_advantages_reject_invalid_sizes_and_kinds():
    rewards = torch.arange(6.0)
    with pytest.raises(ValueError, match="not a multiple"):
        group_advantages(rewards, group_size=4)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, group_size=1)
    with pytest.raises(ValueError, match="grpo, rloo"):
        group_advantages(rewards, group_size=3, kind="ppo")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(rewards.view(2, 3), group_size=3)


def test_group_advantages_carry_no_gradient_and_accept_integer_rewards():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], requires_grad=True)
    assert not group_advantages(rewards, group_size=2).requires_grad
    torch.testing.assert_close(
        group_advantages(torch.tensor([1, 0, 1, 1]), 2, kind="rloo"),
        torch.tensor([1.0, -1.0, 0.0, 0.0]),
    )
