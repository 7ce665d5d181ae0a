"""The one training loop every gradient-based stage uses (SFT, reward model, DPO).

Straight-line code: for each optimizer step, take that step's examples from the epoch plan,
split them into micro-batches, accumulate gradients normalised by the step's total loss units
(tokens for SFT, pairs for reward and DPO), clip, step, log, evaluate and checkpoint. A stage
supplies a `TrainingObjective`: how to collate examples and the loss of a micro-batch.

Normalising by the units of the whole step (not by micro-batch) makes gradient accumulation
exact: one batch of 8 and eight accumulated batches of 1 give the same update.

On several processes (`accelerate launch`, DDP) `batch_size` is the global batch: each process
takes every world-th example of the step (`distributed.shard`), the loss is normalised by the
units of the whole step over every process, and the logged loss and metrics are reduced over
processes, so N processes reach the update one process makes on the same step. Only the main
process logs, evaluates and saves checkpoints; every process waits on a barrier at the end so
the caller can save the model from the main process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from rlhf_core.config.training import (
    MIXED_PRECISION,
    TrainSettings,
)
from rlhf_core.training.batching import plan_epoch, split_micro_batches
from rlhf_core.training.checkpoint import CheckpointManager
from rlhf_core.training.distributed import reduce_named_sums, shard
from rlhf_core.training.divergence import describe_examples, require_finite
from rlhf_core.training.schedule import build_scheduler

log = logging.getLogger(__name__)


class TrainingObjective(Protocol):
    """What a stage tells the loop about its data and loss."""

    lengths: Sequence[int]  # per training example, for length grouping and token budgets

    def collate(self, indices: list[int]) -> dict[str, Any]:
        """Tensors for the examples at `indices`."""

    def units(self, batch: dict[str, Any]) -> int:
        """How many loss units (tokens, pairs) the batch holds; the step's loss is per unit."""

    def tokens(self, batch: dict[str, Any]) -> int:
        """Real (non-padding) tokens the batch's forward passes process."""

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        """Sum of per-unit losses over the batch, and metric sums over the same units."""

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics (called under no_grad, model in eval mode)."""


@dataclass
class TrainResult:
    """What a run did: steps, per-step history, final evaluation and throughput."""

    global_step: int
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    tokens: int = 0

    def summary(self) -> dict[str, float | int]:
        """The run's shape and speed: steps, the step it resumed from, seconds, mean tokens/s."""
        return {
            "steps": self.global_step,
            "resumed_from": self.resumed_from,
            "train_seconds": round(self.train_seconds, 3),
            "mean_tokens_per_s": self.tokens / self.train_seconds if self.train_seconds else 0.0,
        }


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on ≥2-D weights, none on biases and norm gains."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def total_steps(settings: TrainSettings, num_examples: int) -> int:
    """Optimizer steps of the run."""
    if settings.max_steps:
        return settings.max_steps
    return max(1, math.ceil(settings.epochs * math.ceil(num_examples / settings.batch_size)))


def progress_bar(enabled: bool):
    """The training progress bar (rich): steps, elapsed, remaining and a status field."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        disable=not enabled,
    )


def train(
    model: torch.nn.Module,
    task: TrainingObjective,
    settings: TrainSettings,
    *,
    checkpoints: CheckpointManager | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    accelerator: Any = None,
    description: str = "train",
    show_progress: bool = True,
) -> TrainResult:
    """Train `model` on `task`; resume from the newest matching checkpoint if there is one."""
    from accelerate import Accelerator

    seed_everything(settings.seed)
    if accelerator is None:
        precision = settings.mixed_precision
        if precision == "auto":  # as `compute.precision: auto` on this machine's default device
            from rlhf_core.config.compute import ComputeSettings
            from rlhf_core.devices import resolve_device, resolve_precision

            compute = ComputeSettings()
            precision = resolve_precision(compute, resolve_device(compute))
        accelerator = Accelerator(mixed_precision=MIXED_PRECISION[precision])
    lengths = list(task.lengths)
    if not lengths:
        raise ValueError("no training examples")
    world = accelerator.num_processes
    if settings.batch_size < world:
        raise ValueError(f"batch_size {settings.batch_size} < number of processes {world}")
    steps = total_steps(settings, len(lengths))
    steps_per_epoch = math.ceil(len(lengths) / settings.batch_size)
    optimizer = torch.optim.AdamW(
        param_groups(model, settings.weight_decay),
        lr=settings.learning_rate,
        betas=(settings.adam_beta1, settings.adam_beta2),
    )
    scheduler = build_scheduler(
        optimizer, steps, settings.warmup_steps, settings.schedule, settings.min_lr_ratio
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    start = 0
    result = TrainResult(global_step=0, resumed_from=0)
    if not accelerator.is_main_process:  # the main process alone logs and evaluates
        on_log = on_eval = None
    if checkpoints is not None and (latest := checkpoints.latest()) is not None:
        state = checkpoints.load(latest, accelerator.unwrap_model(model), optimizer, scheduler)
        start = state.global_step
        log.info("resuming %s from %s (step %d of %d)", description, latest, start, steps)
        result = _resumed_result(state.extra, start, on_log, on_eval)
    trainable = [p for p in model.parameters() if p.requires_grad]
    plans: dict[int, list[list[int]]] = {}
    started = time.perf_counter()
    model.train()
    with progress_bar(show_progress and accelerator.is_main_process) as bar:
        bar_task = bar.add_task(description, total=steps, completed=start, status="")
        for step in range(start, steps):
            epoch, position = divmod(step, steps_per_epoch)
            if epoch not in plans:
                plans = {
                    epoch: plan_epoch(
                        lengths, settings.batch_size, settings.seed, epoch, settings.group_by_length
                    )
                }
            where = f"{description} optimizer step {step + 1} of {steps}"
            metrics = _optimizer_step(
                model, task, settings, accelerator, optimizer, trainable, plans[epoch][position],
                lengths, where,
            )  # fmt: skip
            metrics["lr"] = scheduler.get_last_lr()[0]
            scheduler.step()
            result.global_step = step + 1
            result.tokens += int(metrics["tokens"])
            result.history.append({"step": step + 1, **metrics})
            if on_log is not None:
                on_log(step + 1, metrics)
            bar.update(bar_task, advance=1, status=f"loss {metrics['loss']:.4f}")
            is_last = step + 1 == steps
            if settings.eval_every and (step + 1) % settings.eval_every == 0 and not is_last:
                _evaluate(accelerator, model, task, step + 1, result, on_eval)
            if (
                checkpoints is not None
                and settings.checkpoint_every
                and (step + 1) % settings.checkpoint_every == 0
                and not is_last
                and accelerator.is_main_process
            ):
                checkpoints.save(
                    step + 1,
                    accelerator.unwrap_model(model),
                    optimizer,
                    scheduler,
                    extra=_progress(result),
                )
    result.train_seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()  # every process has made its last update
    _evaluate(accelerator, model, task, result.global_step, result, on_eval)
    result.final_eval = result.eval_history[-1] if result.eval_history else {}
    return result


def _progress(result: TrainResult) -> dict[str, Any]:
    """What a checkpoint keeps of the run so far: its curves (tokens count every process's
    work, seconds this run's)."""
    return {"history": result.history, "eval_history": result.eval_history}


def _resumed_result(progress: dict[str, Any], start: int, on_log, on_eval) -> TrainResult:
    """The result of the run up to checkpoint step `start` (`_progress`), its curves replayed
    to the callbacks: the resumed run's curves file and MLflow history hold every step."""
    result = TrainResult(global_step=start, resumed_from=start)
    result.history = list(progress.get("history", []))
    result.eval_history = list(progress.get("eval_history", []))
    replay_history(result.history, on_log)
    replay_history(result.eval_history, on_eval)
    return result


def replay_history(rows: list[dict[str, Any]], callback) -> None:
    """Call `callback(step, metrics)` for each restored history row (`{"step": n, ...}`)."""
    if callback is None:
        return
    for row in rows:
        callback(row["step"], {key: value for key, value in row.items() if key != "step"})


def _optimizer_step(
    model, task, settings, accelerator, optimizer, trainable, step_examples, lengths, where
) -> dict[str, float]:
    """Forward/backward this process's share of one step's examples, then clip and update.

    A process whose share is empty runs one of the step's examples with weight zero, so it
    takes part in the gradient all-reduce. The loss and metric sums are reduced over
    processes before the checks: a NaN or infinite loss or gradient norm on any process
    raises TrainingDivergedError on every process before the update (`where` names the step).
    """
    step_started = time.perf_counter()
    own = shard(step_examples, accelerator.process_index, accelerator.num_processes)
    weight = 1.0 if own else 0.0
    micro_batches = split_micro_batches(
        own or list(step_examples[:1]),
        lengths,
        settings.micro_batch_size,
        settings.max_tokens_per_micro_batch,
    )
    batches = [task.collate(indices) for indices in micro_batches]
    local_units = weight * sum(task.units(batch) for batch in batches)
    global_units = reduce_named_sums(accelerator, {"units": local_units})["units"]
    if global_units == 0:
        raise ValueError("an optimizer step has no loss units (e.g. no completion tokens)")
    # DDP averages gradients over processes; scale so the result is the mean over all units.
    scale = weight * accelerator.num_processes / global_units
    sums = {"loss": 0.0, "tokens": 0.0}
    first_bad: tuple[int, float] | None = None  # (micro-batch, its loss)
    for index, batch in enumerate(batches):
        is_last = index == len(batches) - 1
        sync = contextlib.nullcontext() if is_last else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            batch_loss, batch_metrics = task.loss(model, batch)
            accelerator.backward(batch_loss * scale)
        if not own:  # the zero-weight stand-in counts nowhere, but its metric names do
            sums.update(dict.fromkeys(batch_metrics, 0.0))
            continue
        batch_loss_value = float(batch_loss.detach())
        if first_bad is None and not math.isfinite(batch_loss_value):
            first_bad = (index, batch_loss_value)
        sums["loss"] += batch_loss_value
        sums["tokens"] += task.tokens(batch)
        for key, value in batch_metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    grad_norm = _grad_norm(accelerator, trainable, settings.max_grad_norm)
    totals = reduce_named_sums(accelerator, sums)
    if first_bad is not None:
        index, value = first_bad
        examples = describe_examples(micro_batches[index])
        require_finite("loss", value, lambda: f"{where}, micro-batch {index + 1} ({examples})")
    require_finite("loss", totals["loss"], lambda: f"{where} (on another process)")
    require_finite(
        "gradient norm", grad_norm, lambda: f"{where} ({describe_examples(step_examples)})"
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - step_started
    tokens = totals.pop("tokens")
    metrics = {key: value / global_units for key, value in totals.items()}
    metrics.update(grad_norm=grad_norm, tokens=tokens)
    metrics["tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
    return metrics


def _grad_norm(accelerator, trainable, max_norm: float) -> float:
    if max_norm and max_norm > 0:
        return float(accelerator.clip_grad_norm_(trainable, max_norm))
    grads = [p.grad.detach().norm() for p in trainable if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _evaluate(accelerator, model, task, step, result: TrainResult, on_eval) -> None:
    """Held-out metrics on the main process (the model unwrapped: no collective calls)."""
    evaluate = getattr(task, "evaluate", None)
    if evaluate is None or not accelerator.is_main_process:
        return
    model.eval()
    with torch.no_grad():
        metrics = evaluate(accelerator.unwrap_model(model))
    model.train()
    if metrics:
        result.eval_history.append({"step": step, **metrics})
        if on_eval is not None:
            on_eval(step, metrics)
