"""Length-grouped, seeded batching: similar lengths together so little compute goes to padding.

An epoch's plan is a pure function of (lengths, seed, epoch): resuming at step k replays the
same plan and skips its first k steps, so an interrupted run sees the same data in the same
order as an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

# Examples are sorted by length inside windows of this many batches, then the batches are
# shuffled: near-sorted batches (little padding) in random order (no length curriculum).
SORT_WINDOW_BATCHES = 32


def plan_epoch(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    shuffle: bool = True,
) -> list[list[int]]:
    """Example indices for each optimizer step of one epoch (the last batch may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(lengths)))
    rng = random.Random(f"{seed}:{epoch}")
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        window = batch_size * SORT_WINDOW_BATCHES
        order = [
            index
            for start in range(0, len(order), window)
            for index in sorted(order[start : start + window], key=lambda i: -lengths[i])
        ]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if shuffle and group_by_length:
        rng.shuffle(batches)
    return batches


def split_micro_batches(
    indices: Sequence[int],
    lengths: Sequence[int],
    micro_batch_size: int | None = None,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Split one optimizer step's examples into micro-batches (gradient accumulation).

    Examples are taken longest first; a micro-batch closes when it holds `micro_batch_size`
    examples or when one more would make (examples × longest length) exceed `max_tokens`
    (dynamic batching: short sequences travel in larger micro-batches). With neither limit
    the whole step is one micro-batch.
    """
    ordered = sorted(indices, key=lambda i: -lengths[i])
    micro_batches: list[list[int]] = []
    current: list[int] = []
    for index in ordered:
        longest = lengths[current[0]] if current else lengths[index]
        full = micro_batch_size is not None and len(current) >= micro_batch_size
        too_many_tokens = max_tokens is not None and (len(current) + 1) * longest > max_tokens
        if current and (full or too_many_tokens):
            micro_batches.append(current)
            current = []
        current.append(index)
    if current:
        micro_batches.append(current)
    return micro_batches
