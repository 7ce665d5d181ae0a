"""Length buckets: a padded batch run as sub-batches of similar length gives the same results."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import two_layer_llama
from transformers import LlamaForCausalLM

from rlhf_core.training.buckets import length_buckets, map_length_buckets


@given(
    st.lists(st.integers(1, 300), min_size=1, max_size=40),
    st.floats(0.3, 1.0),
    st.integers(1, 6),
)
def test_buckets_cover_every_row_once_longest_first_within_tolerance(lengths, tolerance, rows):
    buckets = length_buckets(lengths, tolerance, rows)
    flat = [i for bucket in buckets for i in bucket]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for position, bucket in enumerate(buckets):
        if len(buckets) > 1:
            assert len(bucket) >= rows  # small tails merge into the bucket before
        if position < len(buckets) - 1:  # past its first `rows` rows, a bucket is tight
            longest = lengths[bucket[0]]
            assert all(lengths[i] >= tolerance * longest for i in bucket[rows:])


def test_buckets_by_hand():
    lengths = [250, 100, 240, 120, 230, 110, 235, 105]
    assert length_buckets(lengths, 0.8, 4) == [[0, 2, 6, 4], [3, 5, 7, 1]]
    assert length_buckets(lengths, 0.8, 5) == [[0, 2, 6, 4, 3, 5, 7, 1]]  # tail too small
    assert length_buckets([7], 0.8, 4) == [[0]]
    with pytest.raises(ValueError):
        length_buckets([1], 0.0, 1)
    with pytest.raises(ValueError):
        length_buckets([1], 0.8, 0)


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return two_layer_llama(40)


def test_bucketed_forward_equals_one_padded_pass_values_and_gradients():
    model = _model()
    lengths = [30, 8, 28, 9, 27, 7, 29, 10]
    width = max(lengths)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 40, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    input_ids = input_ids * mask  # padding id 0
    batch = {"input_ids": input_ids, "attention_mask": mask}

    def row_scores(part):
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
        return (logits.logsumexp(-1) * part["attention_mask"]).sum(-1)  # (rows,)

    direct = row_scores(batch)
    direct.pow(2).sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    calls = []
    handle = model.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    bucketed = map_length_buckets(batch, row_scores, tolerance=0.8, min_rows=4)
    handle.remove()
    bucketed.pow(2).sum().backward()

    assert calls == [(4, 30), (4, 10)]  # two passes, each trimmed to its own width
    torch.testing.assert_close(bucketed, direct, atol=1e-4, rtol=1e-5)
    for got, want in zip((p.grad for p in model.parameters()), expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_one_bucket_keeps_row_order_and_trims_padding_columns():
    lengths = [3, 5, 4]
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    batch = {"input_ids": torch.arange(18).view(3, 6), "attention_mask": mask}
    widths = []

    def first_token(part):
        widths.append(part["input_ids"].shape[1])
        return part["input_ids"][:, 0]

    out = map_length_buckets(batch, first_token, min_rows=4)
    assert out.tolist() == [0, 6, 12] and widths == [max(lengths)]
