"""Stop training at the first NaN or infinite loss or gradient, before it reaches the weights.

A diverged run keeps producing NaN for every remaining step and then writes an all-NaN model
that the next stage happily loads. The loops check every micro-batch's loss and the step's
gradient norm before the optimizer update, and raise `TrainingDivergedError` naming the step
and the examples: the weights, the optimizer state and every checkpoint written so far keep
their last finite values, and the stage writes no model (it raises before saving).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

_SHOWN_EXAMPLES = 8


class TrainingDivergedError(RuntimeError):
    """A loss or gradient norm that is NaN or infinite: training stopped before the update."""


def describe_examples(indices: Sequence[int], noun: str = "examples") -> str:
    """'examples 3, 17, 40' (the first few, then how many more)."""
    shown = ", ".join(str(index) for index in indices[:_SHOWN_EXAMPLES])
    more = len(indices) - _SHOWN_EXAMPLES
    return f"{noun} {shown}" + (f" and {more} more" if more > 0 else "")


def require_finite(what: str, value: float, where: Callable[[], str]) -> None:
    """Raise `TrainingDivergedError` unless `value` is finite.

    `what`: "loss" or "gradient norm"; `where()`: the step and the examples, as the loop names
    them ("sft optimizer step 12 of 40, micro-batch 2 (examples 3, 17)"), made only on failure.
    """
    if math.isfinite(value):
        return
    raise TrainingDivergedError(
        f"{where()}: the {what} is {value}. Training stopped before this update: no model is "
        "written, and the weights and checkpoints keep their last finite values. Lower the "
        "learning rate, clip gradients (max_grad_norm), or check those examples."
    )
