"""Tests for rlhf_core/algorithms/logprobs.py.

Each function is checked three ways: against numbers worked out by hand from its formula,
against a slow reference written with plain Python loops, and (for gradients) by comparing
autograd through the implementation with autograd through that reference, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_math import F64, log_sum_exp_loop, weighted_grads
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_core.algorithms.logprobs import (
    sequence_logprobs,
    sft_loss,
    shift_for_causal_lm,
    token_entropy,
    token_logprobs,
)

# --------------------------------------------------------------------------------------------
# Slow references: plain loops over the formula, one scalar at a time.
# --------------------------------------------------------------------------------------------


def token_logprobs_loop(logits, labels, mask) -> torch.Tensor:
    batch, seq, vocab = logits.shape
    rows = []
    for b in range(batch):
        row = []
        for t in range(seq):
            if mask[b, t]:
                token_logits = [logits[b, t, v] for v in range(vocab)]
                row.append(logits[b, t, labels[b, t]] - log_sum_exp_loop(token_logits))
            else:
                row.append(torch.zeros((), dtype=logits.dtype))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def sequence_logprobs_loop(logits, labels, mask, average=False) -> torch.Tensor:
    batch, seq, _ = logits.shape
    totals = []
    for b in range(batch):
        total = torch.zeros((), dtype=logits.dtype)
        count = 0
        for t in range(seq):
            if mask[b, t]:
                total = total + torch.log_softmax(logits[b, t], dim=-1)[labels[b, t]]
                count += 1
        totals.append(total / count if average else total)
    return torch.stack(totals)


def entropy_loop(logits) -> torch.Tensor:
    batch, seq, vocab = logits.shape
    rows = []
    for b in range(batch):
        row = []
        for t in range(seq):
            normaliser = log_sum_exp_loop([logits[b, t, v] for v in range(vocab)])
            entropy = torch.zeros((), dtype=logits.dtype)
            for v in range(vocab):
                log_p = logits[b, t, v] - normaliser
                entropy = entropy - torch.exp(log_p) * log_p
            row.append(entropy)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def sft_loss_loop(logits, labels, mask) -> torch.Tensor:
    batch, seq, _ = logits.shape
    total = torch.zeros((), dtype=logits.dtype)
    count = 0
    for b in range(batch):
        for t in range(seq):
            if mask[b, t]:
                total = total - torch.log_softmax(logits[b, t], dim=-1)[labels[b, t]]
                count += 1
    return total / count


def random_batch(batch=3, seq=5, vocab=7, seed=0, ignore_label=-100):
    """Float64 logits, labels, and a mask with at least one token per row; masked labels = -100."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=generator, dtype=F64) * 2
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    mask = torch.rand(batch, seq, generator=generator) < 0.6
    mask[:, 0] = True
    labels = labels.masked_fill(~mask, ignore_label)
    return logits, labels, mask


# --------------------------------------------------------------------------------------------
# shift_for_causal_lm
# --------------------------------------------------------------------------------------------


def test_shift_for_causal_lm_pairs_each_logit_with_the_next_token():
    logits = torch.randn(2, 4, 6)
    input_ids = torch.tensor([[1, 2, 3, 4], [5, 0, 2, 1]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    shifted_logits, labels, shifted_mask = shift_for_causal_lm(logits, input_ids, mask)
    assert torch.equal(shifted_logits[:, 2], logits[:, 2])
    assert shifted_logits.shape == (2, 3, 6)
    assert torch.equal(labels, torch.tensor([[2, 3, 4], [0, 2, 1]]))
    assert torch.equal(shifted_mask, torch.tensor([[0, 1, 1], [1, 1, 0]]))
    assert shifted_logits.data_ptr() == logits.data_ptr()  # a view, not a copy


def test_shift_for_causal_lm_rejects_single_token_sequences():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        shift_for_causal_lm(
            torch.randn(1, 1, 3), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
        )


# --------------------------------------------------------------------------------------------
# token_logprobs / sequence_logprobs
# --------------------------------------------------------------------------------------------


def test_sequence_logprobs_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]], dtype=F64)
    labels = torch.tensor([[1, 0]])
    first = 2.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5))
    second = 0.0 - math.log(math.exp(0.0) + math.exp(-1.0) + math.exp(3.0))

    full = sequence_logprobs(logits, labels, torch.tensor([[1, 1]]))
    assert full.item() == pytest.approx(first + second, abs=1e-12)
    mean = sequence_logprobs(logits, labels, torch.tensor([[1, 1]]), average=True)
    assert mean.item() == pytest.approx((first + second) / 2, abs=1e-12)

    only_second = sequence_logprobs(logits, torch.tensor([[-100, 0]]), torch.tensor([[0, 1]]))
    assert only_second.item() == pytest.approx(second, abs=1e-12)
    tokens = token_logprobs(logits, labels)
    assert tokens[0].tolist() == pytest.approx([first, second], abs=1e-12)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_matches_loop_reference_with_gradients(average):
    logits, labels, mask = random_batch(seed=1)
    actual = sequence_logprobs(logits, labels, mask, average=average)
    expected = sequence_logprobs_loop(logits, labels, mask, average=average)
    torch.testing.assert_close(actual, expected)

    (grad,) = weighted_grads(
        lambda z: sequence_logprobs(z, labels, mask, average=average), [logits]
    )
    (grad_ref,) = weighted_grads(
        lambda z: sequence_logprobs_loop(z, labels, mask, average=average), [logits]
    )
    torch.testing.assert_close(grad, grad_ref)


def test_average_equals_sum_divided_by_token_count():
    logits, labels, mask = random_batch(seed=2)
    summed = sequence_logprobs(logits, labels, mask)
    mean = sequence_logprobs(logits, labels, mask, average=True)
    torch.testing.assert_close(mean, summed / mask.sum(-1))


def test_token_logprobs_matches_loop_reference_with_gradients():
    logits, labels, mask = random_batch(seed=3)
    actual = token_logprobs(logits, labels, mask=mask)
    torch.testing.assert_close(actual, token_logprobs_loop(logits, labels, mask))

    (grad,) = weighted_grads(lambda z: token_logprobs(z, labels, mask=mask), [logits])
    (grad_ref,) = weighted_grads(lambda z: token_logprobs_loop(z, labels, mask), [logits])
    torch.testing.assert_close(grad, grad_ref)


def test_masked_labels_of_any_value_do_not_crash_or_matter():
    logits, labels, mask = random_batch(seed=4)
    with_minus_100 = sequence_logprobs(logits, labels, mask)
    with_huge_pad_id = sequence_logprobs(logits, labels.masked_fill(~mask, 10**6), mask)
    assert torch.isfinite(with_minus_100).all()
    torch.testing.assert_close(with_minus_100, with_huge_pad_id, rtol=0, atol=0)


def test_changing_logits_at_masked_positions_changes_nothing():
    logits, labels, mask = random_batch(seed=5)
    noisy = logits.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), logits.shape[-1], dtype=F64) * 100
    for average in (False, True):
        torch.testing.assert_close(
            sequence_logprobs(logits, labels, mask, average=average),
            sequence_logprobs(noisy, labels, mask, average=average),
            rtol=0,
            atol=0,
        )
    (grad,) = weighted_grads(lambda z: sequence_logprobs(z, labels, mask), [noisy])
    assert torch.count_nonzero(grad[~mask]) == 0


def test_int32_labels_give_the_same_result_as_int64():
    logits, labels, mask = random_batch(seed=24)
    torch.testing.assert_close(
        sequence_logprobs(logits, labels.to(torch.int32), mask),
        sequence_logprobs(logits, labels, mask),
        rtol=0,
        atol=0,
    )


def test_unmasked_out_of_range_label_is_a_clear_error():
    logits, labels, mask = random_batch(seed=6)
    with pytest.raises(ValueError, match="labels must lie in"):
        token_logprobs(logits, labels)  # -100 labels with no mask
    with pytest.raises(ValueError, match="labels must lie in"):
        sequence_logprobs(logits, labels.masked_fill(mask, 7), mask)  # vocab is 7


def test_average_of_a_sequence_without_tokens_is_a_clear_error():
    logits, labels, mask = random_batch(seed=7)
    mask[1] = False
    with pytest.raises(ValueError, match=r"sequences \[1\] have no counted tokens"):
        sequence_logprobs(logits, labels, mask, average=True)
    summed = sequence_logprobs(logits, labels, mask)  # the sum of nothing is simply 0
    assert summed[1].item() == 0.0


def test_shape_mismatch_is_a_clear_error():
    logits, labels, mask = random_batch(seed=8)
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape"):
        sequence_logprobs(logits, labels[:, :-1], mask[:, :-1])
    with pytest.raises(ValueError, match="mask has shape"):
        sequence_logprobs(logits, labels, mask[:, :-1])


def test_half_precision_logits_are_computed_in_float32():
    logits, labels, mask = random_batch(seed=9)
    low_precision = logits.to(torch.bfloat16)
    actual = sequence_logprobs(low_precision, labels, mask)
    assert actual.dtype == torch.float32
    expected = sequence_logprobs(low_precision.to(F64), labels, mask)
    torch.testing.assert_close(actual.to(F64), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_tokens", [1, 2, 3, 4, 6, 7, 11])
def test_chunked_and_unchunked_paths_agree_on_values_and_gradients(chunk_tokens):
    full_logits, input_ids, full_mask = random_batch(batch=3, seq=6, vocab=5, seed=10)
    input_ids = input_ids.clamp(min=0)
    # Work on the shifted, non-contiguous view that trainers pass in.
    _, labels, mask = shift_for_causal_lm(full_logits, input_ids, full_mask)
    unchunked = 10**9

    for fn in (
        lambda z, c: sequence_logprobs(z[:, :-1], labels, mask, chunk_tokens=c),
        lambda z, c: token_logprobs(z[:, :-1], labels, chunk_tokens=c),
        lambda z, c: token_entropy(z[:, :-1], chunk_tokens=c),
        lambda z, c: sft_loss(z[:, :-1], labels, mask, chunk_tokens=c).reshape(1),
    ):
        chunked_value = fn(full_logits, chunk_tokens)
        unchunked_value = fn(full_logits, unchunked)
        torch.testing.assert_close(chunked_value, unchunked_value, rtol=0, atol=1e-13)
        (chunked_grad,) = weighted_grads(lambda z, fn=fn: fn(z, chunk_tokens), [full_logits])
        (unchunked_grad,) = weighted_grads(lambda z, fn=fn: fn(z, unchunked), [full_logits])
        torch.testing.assert_close(chunked_grad, unchunked_grad, rtol=0, atol=1e-13)


class LargeAllocationRecorder(TorchDispatchMode):
    """Records every op output (views excluded) holding more than `limit` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.large_outputs: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            is_large = isinstance(tensor, torch.Tensor) and tensor.numel() > self.limit
            if is_large and not func.is_view:
                self.large_outputs.append((str(func), tuple(tensor.shape)))
        return out


@pytest.mark.parametrize("function", ["sequence_logprobs", "token_entropy"])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 8, 12])
def test_chunking_bounds_every_intermediate_except_the_gradient(function, chunk_tokens):
    batch, seq, vocab = 3, 8, 11
    logits, labels, mask = random_batch(batch=batch, seq=seq, vocab=vocab, seed=23)
    logits.requires_grad_(True)
    # Per-position tensors (batch, seq) are fine; anything vocab-wide must fit in one chunk.
    limit = max(chunk_tokens * vocab, batch * seq)
    with LargeAllocationRecorder(limit) as forward_recorder:
        if function == "sequence_logprobs":
            out = sequence_logprobs(logits, labels, mask, chunk_tokens=chunk_tokens)
        else:
            out = token_entropy(logits, chunk_tokens=chunk_tokens)
    with LargeAllocationRecorder(limit) as backward_recorder:
        out.sum().backward()
    assert forward_recorder.large_outputs == []
    # The only allocation larger than one chunk is the (batch, seq, vocab) gradient itself.
    assert [shape for _, shape in backward_recorder.large_outputs] == [(batch, seq, vocab)]


@pytest.mark.parametrize("chunk_tokens", [1, 4, 100])
def test_chunked_functions_pass_gradcheck(chunk_tokens):
    logits, labels, _ = random_batch(batch=2, seq=3, vocab=4, seed=11)
    labels = labels.clamp(min=0)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs(z, labels, chunk_tokens=chunk_tokens), (logits,)
    )
    assert torch.autograd.gradcheck(
        lambda z: token_entropy(z, chunk_tokens=chunk_tokens), (logits,)
    )


def test_non_positive_chunk_tokens_is_a_clear_error():
    logits, labels, mask = random_batch(seed=12)
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer"):
        sequence_logprobs(logits, labels, mask, chunk_tokens=0)


# --------------------------------------------------------------------------------------------
# token_entropy
# --------------------------------------------------------------------------------------------


def test_token_entropy_by_hand():
    a = 0.7
    p = 1 / (1 + math.exp(-a))  # two classes with logits (a, 0)
    logits = torch.tensor(
        [[[a, 0.0, -math.inf], [3.0, 3.0, 3.0], [5.0, -math.inf, -math.inf]]], dtype=F64
    )
    expected = [-(p * math.log(p) + (1 - p) * math.log(1 - p)), math.log(3.0), 0.0]
    assert token_entropy(logits)[0].tolist() == pytest.approx(expected, abs=1e-12)


def test_token_entropy_gradient_is_finite_with_impossible_tokens():
    logits = torch.tensor([[[0.3, -math.inf, 1.2], [5.0, -math.inf, -math.inf]]], dtype=F64)
    logits.requires_grad_(True)
    token_entropy(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()
    # ∂H/∂z_k = −p_k (log p_k + H); at the certain position H = 0 and p = (1, 0, 0).
    assert logits.grad[0, 1].tolist() == [0.0, 0.0, 0.0]


def test_token_entropy_matches_loop_reference_with_gradients():
    logits, _, _ = random_batch(seed=13)
    torch.testing.assert_close(token_entropy(logits), entropy_loop(logits))
    (grad,) = weighted_grads(token_entropy, [logits])
    (grad_ref,) = weighted_grads(entropy_loop, [logits])
    torch.testing.assert_close(grad, grad_ref)


# --------------------------------------------------------------------------------------------
# sft_loss
# --------------------------------------------------------------------------------------------


def test_sft_loss_by_hand_is_a_token_mean_over_the_whole_batch():
    # Row 0 counts one token, row 1 counts two: the token mean weighs row 1 twice.
    logits = torch.tensor(
        [[[0.0, 1.0], [2.0, 0.0]], [[1.0, 1.0], [0.0, 3.0]]], dtype=F64
    )  # (2, 2, 2)
    labels = torch.tensor([[-100, 0], [0, 1]])
    mask = torch.tensor([[0, 1], [1, 1]])
    nll_row0 = -(2.0 - math.log(math.exp(2.0) + 1.0))
    nll_row1_t0 = math.log(2.0)
    nll_row1_t1 = -(3.0 - math.log(1.0 + math.exp(3.0)))
    expected = (nll_row0 + nll_row1_t0 + nll_row1_t1) / 3
    assert sft_loss(logits, labels, mask).item() == pytest.approx(expected, abs=1e-12)
    mean_of_means = (nll_row0 + (nll_row1_t0 + nll_row1_t1) / 2) / 2
    assert sft_loss(logits, labels, mask).item() != pytest.approx(mean_of_means, abs=1e-6)


def test_sft_loss_matches_loop_reference_with_gradients():
    logits, labels, mask = random_batch(seed=14)
    torch.testing.assert_close(sft_loss(logits, labels, mask), sft_loss_loop(logits, labels, mask))
    (grad,) = weighted_grads(lambda z: sft_loss(z, labels, mask), [logits])
    (grad_ref,) = weighted_grads(lambda z: sft_loss_loop(z, labels, mask), [logits])
    torch.testing.assert_close(grad, grad_ref)


def test_sft_loss_with_an_empty_mask_is_a_clear_error():
    logits, labels, mask = random_batch(seed=15)
    with pytest.raises(ValueError, match="no counted tokens"):
        sft_loss(logits, labels, torch.zeros_like(mask))


# --------------------------------------------------------------------------------------------
# Padding invariance (hypothesis)
# --------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 6),
    vocab=st.integers(2, 9),
    pad=st.integers(1, 5),
    chunk_tokens=st.one_of(st.none(), st.integers(1, 8)),
    seed=st.integers(0, 2**31 - 1),
)
def test_right_padding_never_changes_results(batch, seq, vocab, pad, chunk_tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=generator, dtype=F64) * 3
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    mask = torch.rand(batch, seq, generator=generator) < 0.7
    mask[:, 0] = True
    labels = labels.masked_fill(~mask, -100)

    pad_logits = torch.randn(batch, pad, vocab, generator=generator, dtype=F64) * 50
    pad_labels = torch.randint(-100, 10 * vocab, (batch, pad), generator=generator)
    padded_logits = torch.cat([logits, pad_logits], dim=1)
    padded_labels = torch.cat([labels, pad_labels], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(batch, pad, dtype=torch.bool)], dim=1)

    for average in (False, True):
        torch.testing.assert_close(
            sequence_logprobs(
                padded_logits, padded_labels, padded_mask, average, chunk_tokens=chunk_tokens
            ),
            sequence_logprobs(logits, labels, mask, average),
            rtol=1e-12,
            atol=1e-12,
        )
    torch.testing.assert_close(
        sft_loss(padded_logits, padded_labels, padded_mask, chunk_tokens=chunk_tokens),
        sft_loss(logits, labels, mask),
        rtol=1e-12,
        atol=1e-12,
    )
    torch.testing.assert_close(
        token_entropy(padded_logits, chunk_tokens=chunk_tokens)[:, :seq],
        token_entropy(logits),
        rtol=1e-12,
        atol=1e-12,
    )
