"""Atomic training checkpoints: weights, optimizer, scheduler, RNG states and data position.

A checkpoint is a directory `step-<N>` written under a temporary name and renamed into place,
so a run killed mid-write never leaves a half checkpoint that looks complete. The last K are
kept. Weights are safetensors; the optimizer state is read back with `torch.load(...,
weights_only=True)`, which refuses arbitrary pickled objects. A checkpoint records the
fingerprint of the run that wrote it (params and inputs), and is ignored by a different run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

log = logging.getLogger(__name__)

PREFIX = "step-"


@dataclass(frozen=True)
class TrainerState:
    """Where the loop is: optimizer steps done, and the fingerprint of the run."""

    global_step: int
    fingerprint: str
    extra: dict[str, Any]


def capture_rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python, numpy and torch RNG states (JSON part, tensor part)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    json_part = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *[float(x) for x in np_state[2:]]],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    return json_part, tensors


def restore_rng_state(json_part: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `capture_rng_state`."""
    version, state, gauss = json_part["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)


class CheckpointManager:
    """Saves and finds checkpoints of one run in `directory`, keeping the newest `keep`."""

    def __init__(self, directory: str | Path, keep: int = 2, fingerprint: str = "") -> None:
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.fingerprint = fingerprint

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [
            p
            for p in self.directory.iterdir()
            if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer_state.json").is_file()
        ]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))

    def latest(self) -> Path | None:
        """The newest checkpoint written by a run with the same fingerprint, if any."""
        for path in reversed(self.checkpoints()):
            state = json.loads((path / "trainer_state.json").read_text())
            if state["fingerprint"] == self.fingerprint:
                return path
            log.warning("ignoring checkpoint %s: it belongs to a run with other params", path)
        return None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically and prune old ones."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"{PREFIX}{step:08d}"
        staging = Path(tempfile.mkdtemp(dir=self.directory, prefix=".writing-"))
        try:
            save_model(model, str(staging / "model.safetensors"))
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            rng_json, rng_tensors = capture_rng_state()
            save_file(rng_tensors, str(staging / "rng.safetensors"))
            state = {
                "global_step": step,
                "fingerprint": self.fingerprint,
                "scheduler": scheduler.state_dict(),
                "rng": rng_json,
                "extra": extra or {},
            }
            (staging / "trainer_state.json").write_text(json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old)
        return final

    def load(
        self,
        path: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> TrainerState:
        """Restore everything `save` wrote into the given objects; return the loop state."""
        state = json.loads((path / "trainer_state.json").read_text())
        load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"], load_file(str(path / "rng.safetensors")))
        return TrainerState(state["global_step"], state["fingerprint"], state["extra"])

    def clear(self) -> None:
        """Remove every checkpoint (after a run completed and saved its final model)."""
        shutil.rmtree(self.directory, ignore_errors=True)
