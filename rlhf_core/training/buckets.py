"""Less compute on padding: run a right-padded batch as a few sub-batches of similar length.

A preference micro-batch puts 2b sequences (chosen and rejected, or a ranking's K responses)
through one forward pass, all padded to the longest. Chosen and rejected lengths are
unrelated, so on real data a sixth of such a batch can be padding (17% on the benchmark
workload). Sorting the rows by length and cutting them into buckets whose rows are within a
tolerance of the bucket's longest, each trimmed to its own width, removes most of it; the
outputs are put back in the original row order, gradients included. Results equal the
one-pass results up to float rounding: a row's output depends only on its own real tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# A bucket's rows are at least this fraction of its longest row (at most ~20% padding).
DEFAULT_TOLERANCE = 0.8
# A bucket holds at least this many rows (two: on the benchmark workload, with b = 4 pairs,
# buckets of >= 2 rows gave DPO +7.5% and reward +5.7% tokens/s; >= 4 rows never split).
DEFAULT_MIN_ROWS = 2


def length_buckets(
    lengths: Sequence[int], tolerance: float = DEFAULT_TOLERANCE, min_rows: int = DEFAULT_MIN_ROWS
) -> list[list[int]]:
    """Row indices grouped longest first; a bucket closes when the next row is shorter than
    `tolerance` × the bucket's longest and the bucket already has `min_rows` rows. A last
    bucket smaller than `min_rows` joins the one before. Every index appears once."""
    if not 0.0 < tolerance <= 1.0:
        raise ValueError(f"tolerance must lie in (0, 1], got {tolerance}")
    if min_rows < 1:
        raise ValueError(f"min_rows must be at least 1, got {min_rows}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    buckets: list[list[int]] = []
    for index in order:
        current = buckets[-1] if buckets else None
        if current is None or (
            len(current) >= min_rows and lengths[index] < tolerance * lengths[current[0]]
        ):
            buckets.append([index])
        else:
            current.append(index)
    if len(buckets) > 1 and len(buckets[-1]) < min_rows:
        buckets[-2].extend(buckets.pop())
    return buckets


def map_length_buckets(
    batch: dict[str, Tensor],
    forward: Callable[[dict[str, Tensor]], Tensor],
    tolerance: float = DEFAULT_TOLERANCE,
    min_rows: int = DEFAULT_MIN_ROWS,
) -> Tensor:
    """`forward(sub_batch)` per length bucket of a right-padded batch, outputs in row order.

    `batch` holds (rows, width) tensors, `attention_mask` among them (1 on real tokens, which
    come first in each row); other entries are passed through unchanged. `forward` returns
    a tensor whose first dimension is the sub-batch's rows.
    """
    mask = batch["attention_mask"]
    lengths = mask.sum(-1)
    rows = mask.shape[0]
    buckets = length_buckets(lengths.tolist(), tolerance, min_rows)

    def part(indices: list[int]) -> dict[str, Tensor]:
        width = max(1, int(lengths[indices].max()))
        index = torch.tensor(indices, device=mask.device)
        return {
            key: value.index_select(0, index)[:, :width]
            if isinstance(value, Tensor) and value.dim() == 2 and value.shape[0] == rows
            else value
            for key, value in batch.items()
        }

    if len(buckets) == 1:  # rows stay in their order, trimmed to the longest
        return forward(part(list(range(rows))))
    outputs = torch.cat([forward(part(indices)) for indices in buckets])
    order = torch.tensor([i for indices in buckets for i in indices], device=outputs.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=outputs.device)
    return outputs.index_select(0, inverse)
