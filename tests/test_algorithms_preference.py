"""Tests for rlhf_core/algorithms/preference.py.

Each loss is checked three ways: against numbers worked out by hand from its formula, against a
slow reference written with plain Python loops, and (for gradients) by comparing autograd
through the implementation with autograd through that reference, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference_math import F64, log_sigmoid_loop, log_sum_exp_loop, weighted_grads

from rlhf_core.algorithms.preference import (
    bradley_terry_loss,
    dpo_loss,
    pairwise_ranking_loss,
    plackett_luce_loss,
    reward_accuracy,
    simpo_loss,
)

# --------------------------------------------------------------------------------------------
# Slow references: plain loops over the formula, one scalar at a time.
# --------------------------------------------------------------------------------------------


def bradley_terry_loop(chosen, rejected, margin=None) -> torch.Tensor:
    losses = []
    for i in range(len(chosen)):
        m = 0.0 if margin is None else margin[i]
        losses.append(-log_sigmoid_loop(chosen[i] - rejected[i] - m))
    return torch.stack(losses)


def plackett_luce_loop(scores, lengths) -> torch.Tensor:
    losses = []
    for b in range(scores.shape[0]):
        length = int(lengths[b])
        total = torch.zeros((), dtype=scores.dtype)
        for i in range(length - 1):
            remaining = [scores[b, j] for j in range(i, length)]
            total = total - (scores[b, i] - log_sum_exp_loop(remaining))
        losses.append(total)
    return torch.stack(losses)


def pairwise_ranking_loop(scores, lengths) -> torch.Tensor:
    losses = []
    for b in range(scores.shape[0]):
        length = int(lengths[b])
        pair_losses = []
        for i in range(length):
            for j in range(i + 1, length):
                pair_losses.append(-log_sigmoid_loop(scores[b, i] - scores[b, j]))
        losses.append(sum(pair_losses) / len(pair_losses))
    return torch.stack(losses)


def dpo_loop(pc, pr, rc, rr, beta, loss_type, label_smoothing=0.0) -> torch.Tensor:
    losses = []
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if loss_type == "sigmoid":
            loss = -(1 - label_smoothing) * log_sigmoid_loop(beta * h)
            loss = loss - label_smoothing * log_sigmoid_loop(-beta * h)
        elif loss_type == "ipo":
            loss = (h - 1 / (2 * beta)) ** 2
        else:
            loss = torch.clamp(1 - beta * h, min=0.0)
        losses.append(loss)
    return torch.stack(losses)


def simpo_loop(pc, pr, len_c, len_r, beta, gamma_beta_ratio, label_smoothing=0.0):
    losses = []
    for i in range(len(pc)):
        gap = beta * pc[i] / len_c[i] - beta * pr[i] / len_r[i] - gamma_beta_ratio * beta
        loss = -(1 - label_smoothing) * log_sigmoid_loop(gap)
        losses.append(loss - label_smoothing * log_sigmoid_loop(-gap))
    return torch.stack(losses)


# --------------------------------------------------------------------------------------------
# Bradley–Terry
# --------------------------------------------------------------------------------------------


def test_bradley_terry_by_hand():
    chosen = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    rejected = torch.tensor([0.0, 1.5, 2.0], dtype=F64)
    expected = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(2.0)), math.log(2.0)]
    assert bradley_terry_loss(chosen, rejected).tolist() == pytest.approx(expected, abs=1e-12)
    with_margin = bradley_terry_loss(chosen, rejected, margin=0.5)
    expected_margin = [
        math.log(1 + math.exp(-0.5)),
        math.log(1 + math.exp(2.5)),
        math.log(1 + math.exp(0.5)),
    ]
    assert with_margin.tolist() == pytest.approx(expected_margin, abs=1e-12)


@pytest.mark.parametrize("use_margin", [False, True])
def test_bradley_terry_matches_loop_reference_with_gradients(use_margin):
    generator = torch.Generator().manual_seed(16)
    chosen, rejected = torch.randn(2, 8, generator=generator, dtype=F64) * 3
    margin = torch.rand(8, generator=generator, dtype=F64) if use_margin else None
    torch.testing.assert_close(
        bradley_terry_loss(chosen, rejected, margin), bradley_terry_loop(chosen, rejected, margin)
    )
    grads = weighted_grads(lambda c, r: bradley_terry_loss(c, r, margin), [chosen, rejected])
    grads_ref = weighted_grads(lambda c, r: bradley_terry_loop(c, r, margin), [chosen, rejected])
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("margin", [None, 0.75, "tensor"])
def test_bradley_terry_gradient_is_one_minus_sigmoid_even_for_misranked_pairs(margin):
    # Well-ranked, tied, misranked, and badly misranked pairs: a ReLU on the margin would give
    # the last two zero gradient.
    chosen = torch.tensor([3.0, 0.0, -1.0, -20.0], dtype=F64, requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0, 15.0], dtype=F64, requires_grad=True)
    if margin == "tensor":
        margin = torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=F64)
    bradley_terry_loss(chosen, rejected, margin).sum().backward()
    for i in range(4):
        m = 0.0 if margin is None else float(margin if isinstance(margin, float) else margin[i])
        gap = chosen[i].item() - rejected[i].item() - m
        one_minus_sigmoid = 1 - 1 / (1 + math.exp(-gap))
        assert chosen.grad[i].item() == pytest.approx(-one_minus_sigmoid, rel=1e-12)
        assert rejected.grad[i].item() == pytest.approx(one_minus_sigmoid, rel=1e-12)
    assert chosen.grad[3].item() == pytest.approx(-1.0, abs=1e-12)  # misranked: full gradient


def test_bradley_terry_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="rejected_rewards has shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="margin has shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2))


def test_reward_accuracy_counts_strict_wins():
    chosen = torch.tensor([1.0, 0.0, -1.0, 2.0])
    rejected = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert reward_accuracy(chosen, rejected).item() == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Plackett–Luce and pairwise ranking
# --------------------------------------------------------------------------------------------


def test_plackett_luce_by_hand():
    s1, s2, s3 = 2.0, 0.5, -1.0
    scores = torch.tensor([[s1, s2, s3]], dtype=F64)
    first = s1 - math.log(math.exp(s1) + math.exp(s2) + math.exp(s3))
    second = s2 - math.log(math.exp(s2) + math.exp(s3))
    assert plackett_luce_loss(scores).item() == pytest.approx(-(first + second), abs=1e-12)


def test_plackett_luce_equals_bradley_terry_for_two_responses():
    generator = torch.Generator().manual_seed(17)
    chosen, rejected = torch.randn(2, 6, generator=generator, dtype=F64) * 4
    torch.testing.assert_close(
        plackett_luce_loss(torch.stack([chosen, rejected], dim=1)),
        bradley_terry_loss(chosen, rejected),
    )
    # Also when the two responses sit in a wider, padded batch.
    padded = torch.cat([torch.stack([chosen, rejected], 1), torch.randn(6, 3, dtype=F64)], 1)
    lengths = torch.full((6,), 2)
    torch.testing.assert_close(
        plackett_luce_loss(padded, lengths), bradley_terry_loss(chosen, rejected)
    )


@pytest.mark.parametrize("num_slots", [2, 3, 5, 9])
@pytest.mark.parametrize(
    "loss_fn, reference",
    [(plackett_luce_loss, plackett_luce_loop), (pairwise_ranking_loss, pairwise_ranking_loop)],
)
def test_ranking_losses_match_loop_reference_with_gradients(num_slots, loss_fn, reference):
    generator = torch.Generator().manual_seed(num_slots)
    scores = torch.randn(5, num_slots, generator=generator, dtype=F64) * 2
    lengths = torch.randint(2, num_slots + 1, (5,), generator=generator)
    lengths[0] = num_slots
    torch.testing.assert_close(loss_fn(scores, lengths), reference(scores, lengths))
    (grad,) = weighted_grads(lambda s: loss_fn(s, lengths), [scores])
    (grad_ref,) = weighted_grads(lambda s: reference(s, lengths), [scores])
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("loss_fn", [plackett_luce_loss, pairwise_ranking_loss])
def test_padding_beyond_lengths_changes_neither_values_nor_gradients(loss_fn):
    generator = torch.Generator().manual_seed(18)
    scores = torch.randn(4, 7, generator=generator, dtype=F64)
    lengths = torch.tensor([2, 3, 7, 5])
    beyond = torch.arange(7) >= lengths.unsqueeze(1)
    wild = scores.masked_fill(beyond, 0.0) + beyond * torch.randn(4, 7, dtype=F64) * 1e3
    torch.testing.assert_close(loss_fn(scores, lengths), loss_fn(wild, lengths))
    (grad,) = weighted_grads(lambda s: loss_fn(s, lengths), [scores])
    (grad_wild,) = weighted_grads(lambda s: loss_fn(s, lengths), [wild])
    assert torch.count_nonzero(grad[beyond]) == 0
    assert torch.count_nonzero(grad_wild[beyond]) == 0
    torch.testing.assert_close(grad, grad_wild)
    # Each example equals the unpadded computation on its real responses alone.
    for b in range(4):
        alone = loss_fn(scores[b : b + 1, : lengths[b]])
        torch.testing.assert_close(loss_fn(scores, lengths)[b : b + 1], alone)


def test_pairwise_ranking_by_hand():
    s1, s2, s3 = 1.0, 0.0, 0.5
    scores = torch.tensor([[s1, s2, s3]], dtype=F64)
    pairs = [s1 - s2, s1 - s3, s2 - s3]
    expected = sum(math.log(1 + math.exp(-gap)) for gap in pairs) / 3
    assert pairwise_ranking_loss(scores).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("loss_fn", [plackett_luce_loss, pairwise_ranking_loss])
def test_ranking_losses_reject_bad_lengths(loss_fn):
    scores = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"lengths must lie in \[2, 4\]"):
        loss_fn(scores, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[2, 4\]"):
        loss_fn(scores, torch.tensor([2, 5]))
    with pytest.raises(ValueError, match="lengths must be an integer tensor"):
        loss_fn(scores, torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="scores must be a floating-point tensor"):
        loss_fn(torch.zeros(4), None)


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------


def dpo_example():
    policy_chosen = torch.tensor([-1.0, -2.0], dtype=F64)
    policy_rejected = torch.tensor([-3.0, -9.0], dtype=F64)
    ref_chosen = torch.tensor([-1.5, -4.0], dtype=F64)
    ref_rejected = torch.tensor([-2.0, -3.0], dtype=F64)
    # h = (π_c − ref_c) − (π_r − ref_r): pair 0: 0.5 − (−1) = 1.5; pair 1: 2 − (−6) = 8.
    return policy_chosen, policy_rejected, ref_chosen, ref_rejected


def test_dpo_losses_by_hand():
    beta = 0.5
    h = [1.5, 8.0]
    inputs = dpo_example()

    sigmoid, chosen_rewards, rejected_rewards = dpo_loss(*inputs, beta=beta)
    expected = [math.log(1 + math.exp(-beta * x)) for x in h]
    assert sigmoid.tolist() == pytest.approx(expected, abs=1e-12)
    assert chosen_rewards.tolist() == pytest.approx([beta * 0.5, beta * 2.0], abs=1e-12)
    assert rejected_rewards.tolist() == pytest.approx([beta * -1.0, beta * -6.0], abs=1e-12)

    eps = 0.2
    smoothed, _, _ = dpo_loss(*inputs, beta=beta, label_smoothing=eps)
    expected = [
        (1 - eps) * math.log(1 + math.exp(-beta * x)) + eps * math.log(1 + math.exp(beta * x))
        for x in h
    ]
    assert smoothed.tolist() == pytest.approx(expected, abs=1e-12)

    ipo, _, _ = dpo_loss(*inputs, beta=beta, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(1.5 - 1.0) ** 2, (8.0 - 1.0) ** 2], abs=1e-12)

    hinge, _, _ = dpo_loss(*inputs, beta=beta, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([1 - 0.75, 0.0], abs=1e-12)


@pytest.mark.parametrize(
    "loss_type, label_smoothing",
    [("sigmoid", 0.0), ("sigmoid", 0.3), ("ipo", 0.0), ("hinge", 0.0)],
)
def test_dpo_matches_loop_reference_with_gradients(loss_type, label_smoothing):
    generator = torch.Generator().manual_seed(19)
    inputs = list(torch.randn(4, 8, generator=generator, dtype=F64) * 3 - 10)
    beta = 0.3

    def implementation(*logps):
        return dpo_loss(*logps, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)[0]

    def reference(*logps):
        return dpo_loop(*logps, beta, loss_type, label_smoothing)

    torch.testing.assert_close(implementation(*inputs), reference(*inputs))
    grads = weighted_grads(implementation, inputs)
    grads_ref = weighted_grads(reference, inputs)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref)


def test_dpo_without_label_smoothing_is_plain_sigmoid_dpo():
    generator = torch.Generator().manual_seed(20)
    inputs = list(torch.randn(4, 5, generator=generator, dtype=F64))
    losses, _, _ = dpo_loss(*inputs, beta=0.2, label_smoothing=0.0)
    h = (inputs[0] - inputs[2]) - (inputs[1] - inputs[3])
    torch.testing.assert_close(losses, -F.logsigmoid(0.2 * h))


def test_dpo_rewards_are_detached():
    inputs = [x.clone().requires_grad_(True) for x in dpo_example()]
    losses, chosen_rewards, rejected_rewards = dpo_loss(*inputs)
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad
    assert not rejected_rewards.requires_grad


def test_dpo_sigmoid_loss_is_log_two_when_policy_equals_reference():
    generator = torch.Generator().manual_seed(21)
    chosen, rejected = torch.randn(2, 6, generator=generator, dtype=F64) * 5
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen, rejected)
    torch.testing.assert_close(losses, torch.full((6,), math.log(2.0), dtype=F64))
    assert torch.count_nonzero(chosen_rewards) == 0
    assert torch.count_nonzero(rejected_rewards) == 0


def test_dpo_rejects_invalid_arguments():
    inputs = dpo_example()
    with pytest.raises(ValueError, match=r"loss_type must be one of \('sigmoid', 'ipo', 'hinge'\)"):
        dpo_loss(*inputs, loss_type="kto")
    with pytest.raises(ValueError, match="only applies to loss_type='sigmoid'"):
        dpo_loss(*inputs, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\)"):
        dpo_loss(*inputs, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta must be positive"):
        dpo_loss(*inputs, beta=0.0)
    with pytest.raises(ValueError, match="ref_rejected_logps has shape"):
        dpo_loss(*inputs[:3], torch.zeros(3, dtype=F64))


# --------------------------------------------------------------------------------------------
# SimPO
# --------------------------------------------------------------------------------------------


def test_simpo_by_hand():
    policy_chosen = torch.tensor([-4.0, -6.0], dtype=F64)
    policy_rejected = torch.tensor([-9.0, -10.0], dtype=F64)
    chosen_lengths = torch.tensor([4, 3])
    rejected_lengths = torch.tensor([3, 4])
    beta, ratio = 2.0, 0.5  # γ = 1
    # pair 0: r⁺ = 2·(−4/4) = −2, r⁻ = 2·(−9/3) = −6, gap − γ = 3
    # pair 1: r⁺ = 2·(−6/3) = −4, r⁻ = 2·(−10/4) = −5, gap − γ = 0
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        policy_chosen, policy_rejected, chosen_lengths, rejected_lengths, beta, ratio
    )
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-3.0)), math.log(2)], abs=1e-12)
    assert chosen_rewards.tolist() == pytest.approx([-2.0, -4.0], abs=1e-12)
    assert rejected_rewards.tolist() == pytest.approx([-6.0, -5.0], abs=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
def test_simpo_matches_loop_reference_with_gradients(label_smoothing):
    generator = torch.Generator().manual_seed(22)
    chosen, rejected = torch.randn(2, 7, generator=generator, dtype=F64) * 5 - 20
    chosen_lengths = torch.randint(1, 30, (7,), generator=generator)
    rejected_lengths = torch.randint(1, 30, (7,), generator=generator)

    def implementation(c, r):
        return simpo_loss(
            c, r, chosen_lengths, rejected_lengths, 2.5, 0.4, label_smoothing=label_smoothing
        )[0]

    def reference(c, r):
        return simpo_loop(c, r, chosen_lengths, rejected_lengths, 2.5, 0.4, label_smoothing)

    torch.testing.assert_close(implementation(chosen, rejected), reference(chosen, rejected))
    grads = weighted_grads(implementation, [chosen, rejected])
    grads_ref = weighted_grads(reference, [chosen, rejected])
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref)


def test_simpo_rewards_are_detached_and_bad_lengths_rejected():
    chosen = torch.tensor([-4.0, -6.0], requires_grad=True)
    rejected = torch.tensor([-9.0, -10.0], requires_grad=True)
    lengths = torch.tensor([4, 3])
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, lengths, lengths)
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad
    assert not rejected_rewards.requires_grad
    with pytest.raises(ValueError, match="must be positive token counts"):
        simpo_loss(chosen, rejected, lengths, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="chosen_lengths has shape"):
        simpo_loss(chosen, rejected, torch.tensor([4]), lengths)
