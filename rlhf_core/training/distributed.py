"""What the training loops need to run on several processes (`accelerate launch`, DDP).

Each process holds a shard of an optimizer step's examples. The loss is normalised by the
units (tokens, pairs) of the whole step across processes, so the averaged gradient is the one
a single process would compute on the whole step; the logged loss and metrics are sums over
every process divided by the global units. A process whose shard is empty (an epoch's last
step with fewer examples than processes) still runs one backward pass with weight zero, so
it joins the gradient all-reduce instead of leaving the others waiting in it.

With one process every function here is the identity and makes no collective call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's share of one step's examples: every `world`-th, from `rank`."""
    return list(indices[rank::world])


def reduce_sums(accelerator: Any, values: Sequence[float]) -> list[float]:
    """Element-wise sums of `values` over every process (float64; one all-reduce)."""
    if accelerator.num_processes == 1:
        return [float(value) for value in values]
    tensor = torch.tensor(
        [float(v) for v in values], dtype=torch.float64, device=accelerator.device
    )
    return [float(value) for value in accelerator.reduce(tensor, reduction="sum").tolist()]


def reduce_named_sums(accelerator: Any, sums: Mapping[str, float]) -> dict[str, float]:
    """`reduce_sums` of a {name: value} mapping whose names every process shares."""
    names = sorted(sums)
    return dict(zip(names, reduce_sums(accelerator, [sums[name] for name in names]), strict=True))


def any_process(accelerator: Any, flag: bool) -> bool:
    """True on every process when `flag` is true on at least one of them."""
    return reduce_sums(accelerator, [1.0 if flag else 0.0])[0] > 0
