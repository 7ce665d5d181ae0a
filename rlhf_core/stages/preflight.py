"""Before a training stage trains: are its folders writable, and is there room for what it writes?

A stage that finds a read-only folder or a full disk only when it saves its model has spent the
whole training for nothing. `check_training_outputs` probes every folder the stage writes to
(a file created with `create_temporary_beside` and removed) and compares the free space of
each file system with an estimate of what the stage writes there (`estimated_bytes`). A
failure is one `PreflightError` line naming the folder, the free and needed bytes and what to
do, raised before the first training step.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_core.files import create_temporary_beside, write_error_message

# AdamW keeps two moments (exp_avg, exp_avg_sq) per trainable parameter, in its dtype.
OPTIMIZER_STATES_PER_PARAMETER = 2


class PreflightError(OSError):
    """A stage's output folder is not writable or its file system lacks the room it needs."""


@dataclass(frozen=True)
class ModelSize:
    """Bytes of a model's parameters, all and trainable (in their own dtypes)."""

    parameter_bytes: int
    trainable_bytes: int


def model_size(model: Any) -> ModelSize:
    """`ModelSize` of a torch module: numel × element size of each parameter."""
    total = trainable = 0
    for parameter in model.parameters():
        size = parameter.numel() * parameter.element_size()
        total += size
        trainable += size if parameter.requires_grad else 0
    return ModelSize(total, trainable)


def checkpoint_bytes(size: ModelSize) -> int:
    """One checkpoint: the weights plus AdamW's two moments of the trainable parameters."""
    return size.parameter_bytes + OPTIMIZER_STATES_PER_PARAMETER * size.trainable_bytes


def estimated_bytes(size: ModelSize, keep_checkpoints: int, checkpoint_every: int) -> dict:
    """What a training stage writes, in bytes: {"model": ..., "checkpoints": ...}.

        model       = parameter_bytes                     (the final safetensors)
        checkpoints = (keep + 1) × (parameter_bytes + 2 × trainable_bytes)

    `keep + 1` because a new checkpoint is written before the oldest is pruned; no checkpoint
    space when `checkpoint_every` is 0. Tokenizer, metrics and curves are small beside these.
    """
    kept = keep_checkpoints + 1 if checkpoint_every > 0 else 0
    return {"model": size.parameter_bytes, "checkpoints": kept * checkpoint_bytes(size)}


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def probe_writable(folder: Path, what: str) -> None:
    """Create `folder` if needed and a probe file in it, then remove the probe; a folder that
    cannot be written is a `PreflightError` naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = create_temporary_beside(folder / ".write-probe")
        os.close(handle)
        probe.unlink()
    except OSError as error:
        message = write_error_message(what, folder, error)
        raise PreflightError(f"{message} (checked before training)") from error


def space_shortfalls(
    needs: Mapping[Path, int], free: Mapping[Path, int], device: Mapping[Path, int]
) -> list[tuple[list[Path], int, int]]:
    """Folders whose file system has less free space than they need together: a list of
    (folders on that file system, free bytes, needed bytes). Pure: the caller measures."""
    by_device: dict[int, list[Path]] = {}
    for folder in needs:
        by_device.setdefault(device[folder], []).append(folder)
    short = []
    for folders in by_device.values():
        needed = sum(needs[folder] for folder in folders)
        if free[folders[0]] < needed:
            short.append((folders, free[folders[0]], needed))
    return short


def check_training_outputs(
    stage: str,
    model: Any,
    train: Any,
    *,
    model_dir: Path,
    checkpoint_dir: Path,
    small_outputs: Iterable[Path] = (),
) -> dict[Path, int]:
    """Probe the folders a training stage writes and check their free space (module docstring).

    `train` is the stage's TrainSettings or PPOTrainSettings (`keep_checkpoints`,
    `checkpoint_every`); the model is saved beside `model_dir` first (an atomic replace), so
    its parent is probed; `small_outputs` are the metrics and plots folders (probed only).
    Returns the bytes needed per folder.
    """
    size = model_size(model)
    estimate = estimated_bytes(size, train.keep_checkpoints, train.checkpoint_every)
    model_dir, checkpoint_dir = model_dir.absolute(), checkpoint_dir.absolute()
    needs = {model_dir.parent: estimate["model"], checkpoint_dir: estimate["checkpoints"]}
    for folder in small_outputs:
        needs.setdefault(folder.absolute(), 0)
    names = {model_dir.parent: f"the {stage} model", checkpoint_dir: f"{stage} checkpoints"}
    for folder in needs:
        probe_writable(folder, names.get(folder, f"{stage} outputs"))
    free = {folder: shutil.disk_usage(folder).free for folder in needs}
    device = {folder: folder.stat().st_dev for folder in needs}
    for folders, free_bytes, needed in space_shortfalls(needs, free, device):
        listed = " and ".join(str(folder) for folder in folders)
        raise PreflightError(
            f"{stage}: not enough free space for {listed}: {human_bytes(free_bytes)} free, "
            f"about {human_bytes(needed)} needed (the model and "
            f"{train.keep_checkpoints} + 1 checkpoints with optimizer state); free space "
            "there, lower keep_checkpoints or move the project to a larger disk"
        )
    return needs
