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

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's share of one step's examples: every `world`-th, from `rank`."""
    return list(indices[rank::world])


def reduce_sums(accelerator: Any, values: Sequence[float]) -> list[float]:
    """Element-wise sums of `values` over every process (float64; one all-reduce). Without an
    accelerator (None) or with one process, the values themselves."""
    if accelerator is None or accelerator.num_processes == 1:
        return [float(value) for value in values]
    tensor = torch.tensor(
        [float(v) for v in values], dtype=torch.float64, device=accelerator.device
    )
    return [float(value) for value in accelerator.reduce(tensor, reduction="sum").tolist()]


def reduce_named_sums(accelerator: Any, sums: Mapping[str, float]) -> dict[str, float]:
    """`reduce_sums` of a {name: value} mapping whose names every process shares."""
    names = sorted(sums)
    return dict(zip(names, reduce_sums(accelerator, [sums[name] for name in names]), strict=True))


def unsupported_engine(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why a launched process cannot train under the engine its accelerate config chose, or
    None. The training loops save checkpoints and the model from the main process's own
    weights and step the optimizer themselves: right for DDP, not for FSDP2's or ZeRO's
    sharded states, nor for DeepSpeed's engine, which steps on its own."""
    for variable, engine in (
        ("ACCELERATE_USE_FSDP", "FSDP"),
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
    ):
        if environ.get(variable, "").lower() == "true":
            return (
                f"launch.config_file asks for {engine}, which the training stages do not run "
                "yet (they save checkpoints and models from the main process's weights, not "
                "from sharded states); use infra/accelerate/ddp.yaml or launch.config_file: "
                "null (DDP), see infra/README.md"
            )
    return None
